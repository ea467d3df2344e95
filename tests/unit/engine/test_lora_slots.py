"""Adapters replacing each other in slots: the CPU pass's copy of the LoRA stacks after a slot is rewritten in place
is what reading every stack again gives, and an adapter's prefix-cache entries follow it out of its slot and back,
until it leaves host memory."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bentoservice.engine.adapters import AdapterManager, PreparedAdapter
from bentoservice.engine.forward import Forward
from bentoservice.engine.lean import LeanModel

TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj")


def adapter(model: LlamaForCausalLM, name: str, rank: int, targets: tuple[str, ...], seed: int) -> PreparedAdapter:
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for i in range(model.config.num_hidden_layers):
        for target in targets:
            path = f"model.layers.{i}.{target}"
            layer = model.get_submodule(path)
            weights[path] = (
                torch.randn(rank, layer.in_features, generator=generator),
                torch.randn(layer.out_features, rank, generator=generator),
            )
    return PreparedAdapter(name, name, rank, 2.0 * rank, 2.0, weights)


def small_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config).eval()


def test_a_rewritten_slot_reads_as_a_full_refresh() -> None:
    model = small_llama()
    manager = AdapterManager(model, max_loras=2, max_rank=8, max_cpu_loras=4)
    lean = LeanModel(model, manager.batch, 4)
    # ranks grow (the stacks reallocate), targets differ (a slot's untargeted layers must read as zero), and the
    # later installs evict the least recently used, rewriting a slot in place
    plan = [(4, TARGETS), (8, TARGETS[:2]), (4, TARGETS[2:]), (8, TARGETS), (4, TARGETS[1:3])]
    for seed, (rank, targets) in enumerate(plan):
        layout = manager.batch.layout
        pointers = [group.a.data_ptr() if group.a is not None else None for group in lean.lora_groups()]
        slot = manager.install(adapter(model, f"a{seed}", rank, targets, seed)).slot
        lean.slot_rewritten(slot)
        groups = list(lean.lora_groups())
        if manager.batch.layout == layout:  # rewritten in place: the kernel's pointers stay valid
            assert [group.a.data_ptr() if group.a is not None else None for group in groups] == pointers
        kept = [None if group.a is None else group.a.clone() for group in groups]
        lean.adapters_changed()
        for before, group in zip(kept, groups, strict=True):
            assert (before is None) == (group.a is None)
            if before is not None:
                assert torch.equal(before, group.a)
    assert sorted(manager.loaded) == ["a3", "a4"]


@torch.no_grad()
def test_prefix_entries_follow_their_adapter_across_slots_and_go_when_it_leaves_host_memory() -> None:
    model = small_llama()
    manager = AdapterManager(model, max_loras=1, max_rank=8, max_cpu_loras=1)
    forward = Forward(model, manager.batch, 2, cuda_graphs=False, prefix_bytes=2**24)
    manager.forget = forward.prefixes.drop
    prompt = list(range(10, 40))
    x, y, z = (adapter(model, name, 4, TARGETS, seed) for seed, name in enumerate("xyz"))

    def into_slot(prepared: PreparedAdapter) -> int:
        slot = manager.install(prepared).slot
        forward.slot_rewritten(slot)
        return slot

    def answer(slot: int) -> torch.Tensor:
        return forward.prefill([prompt], [slot], 0)

    computed = answer(into_slot(x))  # x's keys and values kept under x
    assert forward.prefixes.match(x.uid, prompt)[1] == len(prompt) - 1
    slot = into_slot(y)  # x evicted to host memory, y into the same slot: x's entries stay, y finds none of them
    assert forward.prefixes.match(manager.batch.owner(slot), prompt) == (None, 0)
    assert not torch.allclose(answer(slot), computed)
    slot = into_slot(manager.host["x"])  # x back from host memory: it reuses its own entry, with the same logits
    assert forward.prefixes.match(manager.batch.owner(slot), prompt)[1] == len(prompt) - 1
    torch.testing.assert_close(answer(slot), computed, rtol=1e-5, atol=1e-5)
    into_slot(z)  # x to host memory, y (the least recently used there) out to disk: y's entries go
    assert forward.prefixes.match(y.uid, prompt) == (None, 0) and forward.prefixes.match(x.uid, prompt)[0]
    into_slot(adapter(model, "y", 4, TARGETS, 1))  # y read again: x leaves host memory, its entries with it
    assert "x" not in manager.host and forward.prefixes.match(x.uid, prompt) == (None, 0)
