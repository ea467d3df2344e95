"""The attention the engine's model runs: variable-length flash attention for packed prompts, SDPA otherwise.

A prefill pass packs many prompts into one sequence. With a mask that keeps each prompt to itself,
SDPA falls back to a kernel that computes every pair of the pass's tokens; varlen flash attention
(PyTorch's, CUDA only) attends within each prompt and needs no mask. Decode passes keep SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # an older PyTorch: prompts are packed under a mask instead
    varlen_attn = None

NAME = "bentoservice"


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int = 0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HF's attention signature; `cu_seqlens` (prompt boundaries in a packed pass) selects varlen attention."""
    if cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    q = query[0].transpose(0, 1)  # [tokens, heads, dim]
    k = key[0].transpose(0, 1).repeat_interleave(groups, dim=1)
    v = value[0].transpose(0, 1).repeat_interleave(groups, dim=1)
    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scaling, window_size=(-1, 0))
    return out[None], None


def use_varlen(model: torch.nn.Module) -> bool:
    """Switch the model to this attention where varlen attention can run (on a GPU)."""
    if varlen_attn is None or next(model.parameters()).device.type != "cuda":
        return False
    AttentionInterface.register(NAME, attention)
    model.set_attn_implementation(NAME)
    return True
