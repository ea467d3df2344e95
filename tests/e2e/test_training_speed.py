"""The fast SFT path computes what the plain one does: examples packed into one row never see each other, and
training on padding-free batches gives the padded path's losses. (Speed itself is measured in bench/training.py.)"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import packed_batch
from transformers import AutoModelForCausalLM

from bentoservice import store
from bentoservice.training import hardware
from bentoservice.training.config import TrainingConfig
from bentoservice.training.data import formats
from bentoservice.training.jobs.callbacks import ProgressCallback
from bentoservice.training.methods.trainers import build_trainer, hf_dataset, load_tokenizer, training_args
from bentoservice.training.speed import plan as speed

WORDS = "apple river stone cloud green quiet market window silver orange planet garden".split()


def chats(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Chats of varied lengths, some of two turns."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        messages = []
        for _ in range(1 + i % 2):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 40)))
            messages += [{"role": "user", "content": f"Repeat: {text}"}, {"role": "assistant", "content": text}]
        rows.append({"messages": messages})
    return rows


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled tokens of one row."""
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")


def test_packed_examples_never_attend_to_each_other(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    fast = copy.deepcopy(model)
    speed.prepare(fast, padding_free=True)
    torch.manual_seed(0)
    examples = [torch.randint(0, 1000, (n,)).tolist() for n in (7, 33, 2, 18)]
    batch = packed_batch(examples)
    with torch.no_grad():
        packed = fast(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        alone = [model(torch.tensor([ids]), use_cache=False).logits[0] for ids in examples]
        # Each example's logits are those it gets on its own, so its loss is too.
        torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-4, atol=1e-5)
        ends = torch.tensor([len(ids) for ids in examples]).cumsum(0).tolist()
        total = sum(causal_lm_loss(logits, torch.tensor(ids)) for logits, ids in zip(alone, examples, strict=True))
        labels = batch["labels"][0]
        torch.testing.assert_close(causal_lm_loss(packed, labels), total, rtol=1e-5, atol=1e-4)
        assert (labels[[0, *ends[:-1]]] == -100).all()  # no example learns its first token from the one before

        # Changing one example changes nothing in the others; so does packing them without the boundaries
        # (position_ids alone).
        changed = [examples[0], [5] * 33, examples[2], examples[3]]
        batch2 = packed_batch(changed)
        again = fast(**{k: v for k, v in batch2.items() if k != "labels"}, use_cache=False).logits[0]
        torch.testing.assert_close(again[:7], packed[:7])
        torch.testing.assert_close(again[40:], packed[40:])
        bare = fast(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        torch.testing.assert_close(bare, packed)


def sft_trainer(
    tiny: store.StoredModel, rows: list[dict[str, Any]], out: Path, speedups: speed.Speedups, **args: Any
) -> Any:
    tokenizer = load_tokenizer(tiny.path)
    config = TrainingConfig(
        model="tiny",
        lora_dropout=0.0,
        args={
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-3,
            "logging_steps": 1,
            "save_strategy": "no",
            **args,
        },
    )
    dataset = hf_dataset(tokenizer, formats.Dataset("openai_chat", "sft", rows))
    torch.manual_seed(0)  # the same LoRA initialisation for every run
    return build_trainer(
        config,
        hardware.load_model(tiny.path, "cpu", "lora"),
        tokenizer,
        training_args(config, "cpu", out),
        dataset,
        None,
        ProgressCallback(),
        "cpu",
        speedups,
    )


def losses(trainer: Any) -> list[float]:
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_padding_free_training_follows_the_padded_path(tiny: store.StoredModel, tmp_path: Path) -> None:
    rows = chats(16)
    padded = losses(
        sft_trainer(tiny, rows, tmp_path / "padded", speed.Speedups(padding_free=False, labelled_logits=False))
    )
    trainer = sft_trainer(tiny, rows, tmp_path / "fast", speed.defaults("cpu", planned_tokens=0))
    assert trainer.args.padding_free and trainer.labelled_logits
    assert not trainer.args.gradient_checkpointing and trainer.memory is None  # TRL's default recomputes every layer
    fast = losses(trainer)
    assert len(fast) == 4 and fast[-1] < fast[0]  # it learns...
    assert fast == pytest.approx(padded, rel=1e-4)  # ...as the padded path does, step by step

    # With too little memory for any batch, every layer is checkpointed, and the learning is the same.
    short = sft_trainer(tiny, rows, tmp_path / "short", speed.defaults("cpu", planned_tokens=0))
    short.fit_memory(speed.MemoryPlan(keep_per_token=100, input_per_token=1, layers=2, budget=0), largest_batch=10)
    assert losses(short) == pytest.approx(fast, rel=1e-5)
    assert [layer.gradient_checkpointing for layer in short.layers] == [True, True]

    # A step's examples trained in several passes (of at most 40 tokens here) learn what one pass learns. Gradient
    # accumulation by example count becomes one batch, split by tokens.
    split = sft_trainer(
        tiny,
        rows,
        tmp_path / "split",
        speed.defaults("cpu", planned_tokens=0),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    assert (split.args.per_device_train_batch_size, split.args.gradient_accumulation_steps) == (4, 1)
    split.pass_tokens = 40
    assert losses(split) == pytest.approx(fast, rel=1e-5)


def test_the_fused_loss_learns_and_logs_what_trl_does(tiny: store.StoredModel, tmp_path: Path) -> None:
    # On the CPU the fused loss folds its tiles with TRL's torch code; on a GPU with TRL's Triton kernels (below).
    rows = chats(16)
    runs = {}
    for fused in (False, True):
        trainer = sft_trainer(
            tiny,
            rows,
            tmp_path / str(fused),
            speed.Speedups(fused_loss=fused),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
        )
        trainer.pass_tokens = 40  # several passes a step: the loss is normalised by the step's labelled tokens
        assert (trainer.head is not None) == fused
        trainer.train()
        logs = [log for log in trainer.state.log_history if "loss" in log]
        lora = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
        runs[fused] = logs, lora, trainer.state.num_input_tokens_seen
    (trl_logs, trl_lora, trl_seen), (logs, lora, seen) = runs[False], runs[True]
    assert len(logs) == 4 and logs[-1]["loss"] < logs[0]["loss"]
    for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
        assert [log[key] for log in logs] == pytest.approx([log[key] for log in trl_logs], rel=1e-5), key
    for name, weight in trl_lora.items():
        torch.testing.assert_close(lora[name], weight, rtol=1e-4, atol=1e-5)
    assert seen == trl_seen > 0  # the padding-free batches' tokens, counted without Trainer's read-back


def test_a_step_with_an_infinite_loss_is_logged_as_trainer_logs_it(tiny: store.StoredModel, tmp_path: Path) -> None:
    from transformers import TrainerCallback

    class BreakTheModel(TrainerCallback):  # the second step's loss is NaN
        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if state.global_step == 1:
                with torch.no_grad():
                    model.get_base_model().lm_head.weight.fill_(float("nan"))

    logged = {}
    for nan_filter in (True, False):
        trainer = sft_trainer(
            tiny,
            chats(8),
            tmp_path / str(nan_filter),
            speed.defaults("cpu", planned_tokens=0),
            max_steps=2,
            logging_nan_inf_filter=nan_filter,
        )
        trainer.add_callback(BreakTheModel())
        logged[nan_filter] = losses(trainer)
        assert trainer.args.logging_nan_inf_filter is False  # Trainer's own check, which waits for the device, is off
    # Filtered (the default), the NaN step adds the mean of the steps since the last log: none, so 0.
    assert logged[True][1] == 0.0 and logged[True][0] == logged[False][0] > 0
    assert math.isnan(logged[False][1])


def test_checkpointing_some_layers_changes_no_gradient(tiny_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    plan = speed.MemoryPlan(keep_per_token=10, input_per_token=1, layers=4, budget=400)
    assert [plan.checkpointed(tokens) for tokens in (10, 20, 1000)] == [0, 3, 4]

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    speed.prepare(base, padding_free=True)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    batch = packed_batch([torch.randint(0, 1000, (n,)).tolist() for n in (12, 30, 5)])

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(**batch, use_cache=False).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain = gradients()
    model.activation_checkpointing_enable({"use_reentrant": False})
    layers = speed.decoder_layers(model)
    speed.checkpoint_layers(layers, 1)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    checkpointed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad)


def test_fused_lora_layers_compute_what_peft_does(tiny_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from bentoservice.training.speed.fused_lora import all_fusable, fusable, fuse_lora_layers

    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ).train()
    fused = copy.deepcopy(peft_model)
    assert fuse_lora_layers(fused) == 7 * base.config.num_hidden_layers
    attention = fused.get_base_model().model.layers[0].self_attn  # q, k and v computed together, from one input
    assert attention.q_proj.shared_input is attention.v_proj.shared_input
    assert all_fusable(peft_model)  # what CUDA graphs require...
    first = next(m for m in peft_model.modules() if fusable(m))
    first.base_layer.weight.requires_grad_(True)  # ...which a trained base layer is not
    assert not fusable(first) and not all_fusable(peft_model)
    first.base_layer.weight.requires_grad_(False)
    ids = torch.randint(0, 1000, (2, 24))

    def run(model: Any, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    for autocast, tolerance in ((False, {}), (True, {"rtol": 0.05, "atol": 0.05})):
        logits, grads = run(peft_model, autocast)
        fused_logits, fused_grads = run(fused, autocast)
        torch.testing.assert_close(fused_logits, logits, **tolerance)
        assert fused_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert fused_grads[name].dtype == torch.float32
            torch.testing.assert_close(fused_grads[name], grad, **tolerance)
    with torch.no_grad():  # adapters disabled: PEFT's own forward, the bare base
        with peft_model.disable_adapter():
            bare = peft_model(input_ids=ids).logits
        with fused.disable_adapter():
            torch.testing.assert_close(fused(input_ids=ids).logits, bare)
        assert not torch.allclose(fused(input_ids=ids).logits, bare)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_passes_learn_what_eager_passes_do() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from bentoservice.training.speed.fused_lora import fuse_lora_layers
    from bentoservice.training.speed.graphs import graph_decoder

    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(config).to(torch.bfloat16)
    speed.prepare(base, padding_free=True)  # flash attention's varlen kernel, which takes bf16
    eager = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    fuse_lora_layers(eager)
    graphed = copy.deepcopy(eager)
    decoder = graph_decoder(graphed, sequences=4, max_tokens=300, longest=120)
    # Passes of 3 and 2 examples go to buckets of 128 and 256 tokens; 400 tokens are more than the most, and 5
    # examples more than a graphed pass takes, so those two passes run eagerly, in the same step (the first one
    # before any graph, the other between them). Attention is captured for sequences of up to 128 tokens (the
    # padding one included).
    passes = [
        packed_batch([torch.randint(0, 1000, (n,)).tolist() for n in sizes])
        for sizes in ((400,), (12, 30, 5), (100, 90), (7, 3, 9, 4, 20), (40, 50))
    ]

    def train_pass(model: Any, batch: dict[str, Any]) -> float:
        # The loss goes with its autograd graph before the next pass: a graph kept alive would keep the
        # LoRA weights' gradient accumulators on the stream they were made on, which a capture cannot wait for.
        loss = model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}, use_cache=False).loss
        loss.backward()
        return loss.item()

    def step(model: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
        model.zero_grad()
        step_losses = [train_pass(model, batch) for batch in passes]
        return step_losses, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    for _ in range(2):  # the second step replays the graphs captured in the first
        want_losses, want = step(eager)
        got_losses, got = step(graphed)
        assert got_losses == pytest.approx(want_losses, rel=1e-3)
        assert got.keys() == want.keys()
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=0.02, atol=1e-4)
    assert sorted(decoder.buckets) == [128, 256, 384]  # up to the most tokens a pass takes
    decoder.release()  # training over: the decoder's own forward again
    assert decoder.decoder.forward == decoder.eager and not decoder.buckets


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TRL's Triton kernels need a GPU")
def test_the_fused_loss_on_a_gpu_computes_trls_loss_without_waiting_for_it() -> None:
    from trl.kernels import ChunkedLogProbFunction

    from bentoservice.training.speed.fused_loss import TILE, labelled_loss

    torch.manual_seed(0)
    tokens, width, vocab = 8000, 256, 50_000
    head = torch.nn.Linear(width, vocab, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    hidden = (4 * torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda")
    with torch.no_grad():  # a third of the targets are the most likely token, for the accuracy
        top = torch.rand(tokens, device="cuda") < 0.3
        labels[1:][top[1:]] = (hidden[:-1] @ head.weight.t()).argmax(-1)[top[1:]]
    labels[torch.rand(tokens, device="cuda") < 0.4] = -100
    labelled = int((labels[1:] != -100).sum())
    assert labelled > TILE // vocab  # more than one tile
    divisor = torch.tensor(labelled + 100, device="cuda")  # the step's count, over several passes

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any read back to the host raises
    try:
        loss, entropy, top1 = labelled_loss(hidden, labels, labelled, head, divisor)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    grad, hidden.grad = hidden.grad, None

    mask = labels[1:] != -100
    log_p, want_entropy, _, _, want_top1 = ChunkedLogProbFunction.apply(
        hidden[:-1][mask], head.weight, None, labels[1:][mask], 1.0, 32768, None, 1.0, ("entropy", "is_top1")
    )
    want = -log_p.sum() / divisor
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(entropy, want_entropy.sum())
    assert top1 == want_top1.sum() > labelled // 5
    assert grad[:-1][~mask].abs().max() == 0 and grad[-1].abs().max() == 0  # only labelled positions learn
    torch.testing.assert_close(grad, hidden.grad, rtol=0.02, atol=1e-6)
