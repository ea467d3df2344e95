"""Attention within each example of a padding-free batch.

A padding-free batch concatenates its examples into one row: `position_ids` restart at 0 for each example, and
TRL's collator adds `cu_seq_lens_q/k` (where each example starts) and `max_length_q/k`. The attention registered
here as VARLEN attends within each example only: flash attention's varlen kernel on CUDA
(`torch.nn.attention.varlen`), one causal SDPA call per example elsewhere. Nothing is spent on padding and no
`(tokens x tokens)` mask is built. Inputs with a padding mask or a KV cache fall back to plain SDPA.
"""

from __future__ import annotations

import inspect
from functools import cache, partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

VARLEN = "bentoservice_varlen"


@cache
def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, partial(varlen_attention, flash_options=_flash_options()))
    AttentionMaskInterface.register(VARLEN, _mask)


def _flash_options() -> dict[str, Any]:
    """How this torch's `varlen_attn` asks for causal attention and grouped key/value heads (read once, outside
    compiled code): torch 2.13 takes window_size and enable_gqa; earlier releases is_causal, and grouped heads
    as they are."""
    from torch.nn.attention.varlen import varlen_attn

    takes = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in takes else {"is_causal": True}
    return {"causal": causal, "gqa": "enable_gqa" in takes}


def _mask(
    *args: Any, attention_mask: torch.Tensor | None = None, q_length: int = 0, kv_length: int = 0, **kwargs: Any
) -> torch.Tensor | None:
    """No mask where VARLEN needs none (no padding, no cache); SDPA's mask otherwise."""
    if attention_mask is None and q_length == kv_length:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, **kwargs)


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    position_ids: torch.Tensor | None = None,
    flash_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each example of padding-free rows.

    query/key/value: (batch, heads, tokens, dim); the output is (batch, tokens, heads, dim), as transformers'
    attention functions return it.
    """
    import torch

    batch, heads, tokens, dim = query.shape
    if cu_seq_lens_q is None and attention_mask is None and position_ids is not None and key.shape[2] == tokens:
        from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

        # Packed position_ids without the collator's boundaries: the examples start where the positions restart.
        (cu_seq_lens_q, _), (longest, _) = prepare_fa_kwargs_from_position_ids(position_ids.expand(batch, -1))
        max_length_q = int(longest)
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            position_ids=position_ids,
            **kwargs,
        )
    q, k, v = (x.transpose(1, 2).reshape(batch * tokens, x.shape[1], dim) for x in (query, key, value))
    if q.is_cuda:
        assert max_length_q is not None  # the collator's, or computed above, with cu_seq_lens_q
        out = _flash_varlen(q, k, v, cu_seq_lens_q.to(torch.int32), int(max_length_q), scaling, flash_options or {})
    else:
        out = _per_example(q, k, v, cu_seq_lens_q.tolist(), scaling)
    return out.view(batch, tokens, heads, dim), None


def _flash_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scaling: float | None,
    options: dict[str, Any],
) -> torch.Tensor:
    """(tokens, heads, dim) in and out."""
    from torch.nn.attention.varlen import varlen_attn

    gqa = {"enable_gqa": True} if options["gqa"] and key.shape[1] != query.shape[1] else {}
    return varlen_attn(
        query, key, value, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scaling, **options["causal"], **gqa
    )


def _per_example(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[int], scaling: float | None
) -> torch.Tensor:
    """One causal SDPA call per example; (tokens, heads, dim) in and out."""
    import torch
    import torch.nn.functional as F

    gqa = key.shape[1] != query.shape[1]
    # 4D inputs: SDPA's CPU flash kernel takes no others (3D ones fall back to the slower math path).
    parts = [
        F.scaled_dot_product_attention(
            query[None, start:end].transpose(1, 2),
            key[None, start:end].transpose(1, 2),
            value[None, start:end].transpose(1, 2),
            is_causal=True,
            scale=scaling,
            enable_gqa=gqa,
        )[0].transpose(0, 1)
        for start, end in zip(bounds[:-1], bounds[1:], strict=False)
        if end > start
    ]
    return torch.cat(parts)
