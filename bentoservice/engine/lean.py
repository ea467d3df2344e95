"""A lean forward pass for Llama-architecture models on the CPU.

On a CPU the Hugging Face modules spend a decode step's time on their own overhead as much as on the
products: a few dozen small operations per layer, a product per projection and per LoRA stack, and SDPA's
flash kernel, which is slow for one query token. This pass runs the same model with fewer, larger
operations:

- per layer, one oneDNN-prepacked product for [q; k; v] and one for [gate; up] (plus o and down, each adding
  the residual as oneDNN writes its output); the HF layers' dense weights are dropped;
- the LoRA updates of layers that share an input in one call of a compiled kernel (`LoraGroup`, `native`), and
  RMSNorm in another (torch operations where the kernels cannot be built);
- rotary embeddings from the model's own rotary module (so its scaling variants hold), for q and k at once;
- decode attention as two batched products and a softmax over each row's cache, the query heads of one
  KV head side by side; packed prefill keeps SDPA under the prompts' mask.

Keys and values go to the `SlotCache` through `update`, as with the HF modules, so prefill, prefix reuse and
row moves work unchanged. Only the float32 Llama layer (RMSNorm, SiLU MLP, no biases, full attention) runs
here; other models keep the HF modules (`supports`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bentoservice.engine import native
from bentoservice.engine.cache import SlotCache
from bentoservice.engine.lora import LoraBatch, LoraGroup
from bentoservice.engine.packing import drop_weight, linear, linear_add, pack, tied_parameters

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


def supports(model: nn.Module) -> bool:
    """Whether `model` is a float32 Llama-layer model on the CPU that this pass computes exactly."""
    config = model.config
    return (
        type(model).__name__ in ARCHITECTURES
        and torch.backends.mkldnn.is_available()
        and model.dtype == torch.float32
        and next(model.parameters()).device.type == "cpu"
        and config.hidden_act == "silu"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "sliding_window", None) is None
    )


@dataclass
class Layer:
    norm1: torch.Tensor
    qkv: torch.Tensor  # packed [q; k; v]
    o: torch.Tensor
    norm2: torch.Tensor
    gate_up: torch.Tensor  # packed [gate; up]
    down: torch.Tensor
    qkv_lora: LoraGroup
    o_lora: LoraGroup
    gate_up_lora: LoraGroup
    down_lora: LoraGroup


class LeanModel:
    def __init__(self, model: Any, lora: LoraBatch, batch_hint: int, kernels: native.Kernels | None = None) -> None:
        config = model.config
        decoder = model.get_decoder()
        tied = tied_parameters(model)
        self.embedding = model.get_input_embeddings().weight
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm.weight
        self.eps = decoder.norm.variance_epsilon
        attention = decoder.layers[0].self_attn
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.intermediate = config.intermediate_size
        self.kernels = kernels
        kernel = kernels.lora_add if kernels is not None else None

        def packed(parent: nn.Module, names: list[str]) -> torch.Tensor:
            layers = [getattr(parent, name) for name in names]
            weight = pack(torch.cat([layer.weight for layer in layers]), batch_hint)
            for layer in layers:
                drop_weight(getattr(layer, "base", layer), tied)  # a BatchedLoraLinear's own Linear
            return weight

        self.layers: list[Layer] = []
        for layer in decoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                Layer(
                    layer.input_layernorm.weight,
                    packed(attn, ["q_proj", "k_proj", "v_proj"]),
                    packed(attn, ["o_proj"]),
                    layer.post_attention_layernorm.weight,
                    packed(mlp, ["gate_proj", "up_proj"]),
                    packed(mlp, ["down_proj"]),
                    LoraGroup(lora, attn, ["q_proj", "k_proj", "v_proj"], kernel),
                    LoraGroup(lora, attn, ["o_proj"], kernel),
                    LoraGroup(lora, mlp, ["gate_proj", "up_proj"], kernel),
                    LoraGroup(lora, mlp, ["down_proj"], kernel),
                )
            )
        self.head = packed(model, ["lm_head"])  # a weight tied to the input embedding stays
        self.adapters_changed()

    def adapters_changed(self) -> None:
        for group in self.lora_groups():
            group.refresh()

    def slot_rewritten(self, slot: int) -> None:
        for group in self.lora_groups():
            group.slot_rewritten(slot)

    def lora_groups(self) -> Iterator[LoraGroup]:
        for layer in self.layers:
            yield from (layer.qkv_lora, layer.o_lora, layer.gate_up_lora, layer.down_lora)

    def packed_weights(self) -> list[torch.Tensor]:
        return [self.head, *(w for layer in self.layers for w in (layer.qkv, layer.o, layer.gate_up, layer.down))]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.head)

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: SlotCache
    ) -> torch.Tensor:
        """The final hidden states [tokens, hidden] of the pass `cache` was set up for (decode: token i is
        row i's; prefill: packed prompts); mask[i, j]: token i may attend to key j (decode: to row i's
        position j)."""
        hidden = F.embedding(ids, self.embedding)
        cos, sin = self.rotary(hidden, positions[None])
        half = self.head_dim // 2
        sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)[:, None]  # the sign of rotate_half
        rotary = (cos[0, :, None], sin)
        if cache.packed:
            bias = mask[None, None]
        else:  # per (row, KV head), added to the scores
            bias = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill_(~mask, float("-inf"))
            bias = bias.repeat_interleave(self.kv_heads, dim=0)[:, None]
        for index, layer in enumerate(self.layers):
            hidden = self._layer(index, layer, hidden, rotary, bias, cache)
        return self._norm(hidden, self.norm)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.kernels is None:
            return torch.rms_norm(x, weight.shape, weight, self.eps)
        return self.kernels.norm(x, weight, self.eps)

    def _layer(
        self,
        index: int,
        layer: Layer,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        bias: torch.Tensor,
        cache: SlotCache,
    ) -> torch.Tensor:
        tokens, dim = hidden.shape[0], self.head_dim
        x = self._norm(hidden, layer.norm1)
        qkv = linear(x, layer.qkv)
        layer.qkv_lora.add(x, qkv)
        rotated_heads = self.heads + self.kv_heads
        qk = qkv[:, : rotated_heads * dim].view(tokens, rotated_heads, dim)
        cos, sin = rotary
        qk = (qk * cos).addcmul_(qk.roll(dim // 2, -1), sin)
        values = qkv[:, rotated_heads * dim :].view(tokens, self.kv_heads, dim)
        queries, keys = qk[:, : self.heads], qk[:, self.heads :]
        if cache.packed:
            out = self._prefill_attention(index, queries, keys, values, bias, cache)
        else:
            out = self._decode_attention(index, queries, keys, values, bias, cache)
        hidden = linear_add(out, layer.o, hidden)
        layer.o_lora.add(out, hidden)
        x = self._norm(hidden, layer.norm2)
        gate_up = linear(x, layer.gate_up)
        layer.gate_up_lora.add(x, gate_up)
        act = F.silu(gate_up[:, : self.intermediate]).mul_(gate_up[:, self.intermediate :])
        hidden = linear_add(act, layer.down, hidden)
        layer.down_lora.add(act, hidden)
        return hidden

    def _decode_attention(
        self,
        index: int,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        bias: torch.Tensor,
        cache: SlotCache,
    ) -> torch.Tensor:
        """Row i's query heads over row i's cache: [rows * kv_heads, groups, dim] x [.., length, dim]."""
        rows, dim = queries.shape[0], self.head_dim
        keys, values = cache.update(keys[:, :, None], values[:, :, None], index)  # [rows, kv_heads, length, dim]
        length = keys.shape[2]
        q = queries.reshape(rows * self.kv_heads, -1, dim)
        scores = torch.baddbmm(bias, q, keys.reshape(-1, length, dim).transpose(1, 2), alpha=self.scaling)
        out = torch.bmm(scores.softmax(-1), values.reshape(-1, length, dim))
        return out.view(rows, -1)

    def _prefill_attention(
        self,
        index: int,
        queries: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        cache: SlotCache,
    ) -> torch.Tensor:
        keys, values = cache.update(keys.transpose(0, 1)[None], values.transpose(0, 1)[None], index)
        out = F.scaled_dot_product_attention(
            queries.transpose(0, 1)[None], keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True
        )
        return out[0].transpose(0, 1).reshape(queries.shape[0], -1)
