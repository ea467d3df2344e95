"""The CPU pass's copy of the LoRA stacks after adapters replace each other in slots: rewriting one slot in place
gives what reading every stack again gives."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bentoservice.engine.adapters import AdapterManager, PreparedAdapter
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


def test_a_rewritten_slot_reads_as_a_full_refresh() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    model = LlamaForCausalLM(config).eval()
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
