"""PEFT's LoRA linear layers as one autograd function each: fewer kernels, and far less host work a layer.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate modules: five kernels forward (the
scaling and the sum among them), more backward, and several autograd nodes and Python calls per layer. On a GPU
a training pass issues thousands of them and the host, launching them one by one, becomes the bound (see
docs/benchmarks.md). Here the forward is three products, the base one adding into the scaled update (`addmm_`), and
the backward five products with no element-wise passes over activations (only over the rank-wide ones and the LoRA
weights' gradients). Sibling layers that their module calls on the same input (q, k and v; gate and up) run as one
function, which reads that input once and sums its gradient in the products (`SharedInput`). The result is PEFT's.

Only plain LoRA qualifies: one active adapter on an `nn.Linear` base, no dropout (PEFT's default 0), no DoRA or
other variant, not merged. Anything else, or a call PEFT must handle itself (disabled adapters, per-row adapter
names), runs PEFT's own forward.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import nn


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + scaling (x A^T) B^T, with W and b frozen.

    The rank-wide products write first and the large product adds into what they wrote (its epilogue reads it while
    the product is bound by arithmetic): adding a rank-wide product into the large one's output instead would read
    and write that output once more, and out of place copy it first (on the H100 the Llama-3.2-1B shape trained 6%
    fewer tokens a second so).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            h = rows @ a.t()
            if bias is None:
                y = h.new_empty(rows.shape[0], w.shape[0]).addmm_(h, b.t(), beta=0, alpha=scaling)
            else:
                y = torch.addmm(bias.to(dtype), h, b.t(), alpha=scaling)
            y.addmm_(rows, w.t())
        ctx.save_for_backward(rows, h, w, a, b)
        ctx.scaling, ctx.input_shape, ctx.input_dtype = scaling, x.shape, x.dtype
        ctx.lora_dtypes = (lora_a.dtype, lora_b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, h, w, a, b = ctx.saved_tensors
        scaling = ctx.scaling
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(rows.dtype)
            gh = (g @ b).mul_(scaling)  # d(loss)/d(h)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (gh @ a).addmm_(g, w).view(ctx.input_shape).to(ctx.input_dtype)
            grad_a = _product(gh.t(), rows, ctx.lora_dtypes[0])
            grad_b = _product(g.t(), h, ctx.lora_dtypes[1]).mul_(scaling)
        return grad_x, None, None, grad_a, grad_b, None


def _product(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x @ y in `dtype`: on CUDA, written in it by the product itself (one kernel rather than two)."""
    if x.is_cuda and x.dtype != dtype:
        return torch.mm(x, y, out_dtype=dtype)
    return torch.mm(x, y).to(dtype)


class SharedInputFunction(torch.autograd.Function):
    """LoraLinearFunction for sibling layers that take the same input: one rank-wide product for all of them (the
    input read once, forward and backward), and the input's gradient summed by the products that compute it."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, scalings: tuple[float, ...], *params: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        weights, lora_a, lora_b = params[0::3], params[1::3], params[2::3]
        with torch.autocast(device, enabled=False):
            rows = x.reshape(-1, x.shape[-1]).to(dtype)
            ws, bs = [w.to(dtype) for w in weights], [b.to(dtype) for b in lora_b]
            a = torch.cat(lora_a).to(dtype)
            h = rows @ a.t()
            ranks = [b.shape[1] for b in bs]
            ys = [
                h.new_empty(rows.shape[0], w.shape[0]).addmm_(part, b.t(), beta=0, alpha=scaling).addmm_(rows, w.t())
                for part, w, b, scaling in zip(h.split(ranks, dim=1), ws, bs, scalings, strict=True)
            ]
        ctx.save_for_backward(rows, h, a, *ws, *bs)
        ctx.scalings, ctx.ranks, ctx.input_shape, ctx.input_dtype = scalings, ranks, x.shape, x.dtype
        ctx.lora_dtypes = (lora_a[0].dtype, lora_b[0].dtype)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, h, a, *rest = ctx.saved_tensors
        ws, bs = rest[: len(ctx.ranks)], rest[len(ctx.ranks) :]
        with torch.autocast(grads[0].device.type, enabled=False):
            gs = [g.reshape(-1, g.shape[-1]).to(rows.dtype) for g in grads]
            gh = torch.cat([(g @ b).mul_(scaling) for g, b, scaling in zip(gs, bs, ctx.scalings, strict=True)], dim=1)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = gh @ a
                for g, w in zip(gs, ws, strict=True):
                    grad_x.addmm_(g, w)
                grad_x = grad_x.view(ctx.input_shape).to(ctx.input_dtype)
            grads_a = _product(gh.t(), rows, ctx.lora_dtypes[0]).split(ctx.ranks)
            grads_b = [
                _product(g.t(), part, ctx.lora_dtypes[1]).mul_(scaling)
                for g, part, scaling in zip(gs, h.split(ctx.ranks, dim=1), ctx.scalings, strict=True)
            ]
        return grad_x, None, *(grad for pair in zip(grads_a, grads_b, strict=True) for grad in (None, *pair))


class SharedInput:
    """Sibling LoRA layers that their module calls one after another on the same input (a decoder layer's q, k
    and v projections; gate and up): the first call computes them all, the others take their output."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.source: torch.Tensor | None = None
        self.outputs: dict[nn.Module, torch.Tensor] = {}

    def __call__(self, layer: nn.Module, x: torch.Tensor, adapter: str) -> torch.Tensor:
        if self.source is x and layer in self.outputs:
            output = self.outputs.pop(layer)
            if not self.outputs:
                self.source = None
            return output
        params = [
            p for m in self.layers for p in (m.base_layer.weight, m.lora_A[adapter].weight, m.lora_B[adapter].weight)
        ]
        outputs = SharedInputFunction.apply(x, tuple(m.scaling[adapter] for m in self.layers), *params)
        self.outputs = {m: out for m, out in zip(self.layers, outputs, strict=True) if m is not layer}
        self.source = x
        return outputs[self.layers.index(layer)]

    def takes(self, adapter: str) -> bool:
        """Whether every layer runs `adapter` fused, without bias."""
        return all(_fused_adapter(m) == adapter and m.base_layer.bias is None for m in self.layers)


# Sibling layers that Llama-style decoder layers (Llama, Mistral, Qwen2, ...) call on the same input.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _fused_adapter(module: Any) -> str | None:
    """The adapter a PEFT `lora.Linear` can run fused (plain LoRA, one active adapter, no dropout), if any."""
    adapter = module.active_adapters[0] if len(module.active_adapters) == 1 else None
    if (
        adapter is None
        or module.disable_adapters
        or module.merged
        or adapter not in module.lora_A
        or adapter in module.lora_variant
        or not isinstance(module.lora_dropout[adapter], nn.Identity)
    ):
        return None
    return adapter


def fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A PEFT `lora.Linear` forward that runs LoraLinearFunction (or, with its siblings, SharedInputFunction) where it
    can, PEFT's own code otherwise."""
    adapter = _fused_adapter(self)
    if adapter is None or args or kwargs:
        return type(self).forward(self, x, *args, **kwargs)
    shared = getattr(self, "shared_input", None)
    if shared is not None and shared.takes(adapter):
        return shared(self, x, adapter)
    base = self.base_layer
    return LoraLinearFunction.apply(
        x, base.weight, base.bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter]
    )


def fusable(module: nn.Module) -> bool:
    """Whether `module` is a LoRA linear layer that the fused forward takes: a plain, frozen `nn.Linear` base
    (not a quantized one, for one)."""
    from peft.tuners.lora.layer import Linear

    return (
        type(module) is Linear
        and type(module.base_layer) is nn.Linear
        and not module.fan_in_fan_out
        and not module.base_layer.weight.requires_grad
    )


def fuse_lora_layers(model: nn.Module) -> int:
    """Give each fusable LoRA linear layer of `model` the fused forward, siblings that share their input one
    SharedInput; how many layers there were."""
    count = 0
    for module in model.modules():
        if fusable(module):
            module.forward = MethodType(fused_forward, module)
            count += 1
        for names in SHARED_INPUT:
            siblings = [sibling for name in names if (sibling := getattr(module, name, None)) is not None]
            if len(siblings) == len(names) and all(fusable(sibling) for sibling in siblings):
                shared = SharedInput(siblings)
                for sibling in siblings:
                    sibling.shared_input = shared
    return count


def all_fusable(model: nn.Module) -> bool:
    """Whether every PEFT LoRA layer of `model` is fusable."""
    from peft.tuners.lora.layer import LoraLayer

    return all(fusable(module) for module in model.modules() if isinstance(module, LoraLayer))
