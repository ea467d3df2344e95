"""PEFT's LoRA linear layers as one autograd function each: fewer kernels, and far less host work a layer.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate modules: five kernels forward (the
scaling and the sum among them), more backward, and several autograd nodes and Python calls per layer. On a GPU
a training pass issues thousands of them and the host, launching them one by one, becomes the bound (see
docs/benchmarks.md). Here the forward is three products, the base one adding into the scaled update (`addmm_`), and
the backward five products with no element-wise passes over activations (only over the rank-wide ones and the LoRA
weights' gradients). The result is PEFT's.

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
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
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


def fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A PEFT `lora.Linear` forward that runs LoraLinearFunction where it can, PEFT's own code otherwise."""
    adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    if (adapter is None or args or kwargs or self.disable_adapters or self.merged or adapter not in self.lora_A
            or adapter in self.lora_variant or not isinstance(self.lora_dropout[adapter], nn.Identity)):
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer
    return LoraLinearFunction.apply(x, base.weight, base.bias, self.lora_A[adapter].weight,
                                    self.lora_B[adapter].weight, self.scaling[adapter])


def fusable(module: nn.Module) -> bool:
    """Whether `module` is a LoRA linear layer that the fused forward takes: a plain, frozen `nn.Linear` base
    (not a quantized one, for one)."""
    from peft.tuners.lora.layer import Linear

    return (type(module) is Linear and type(module.base_layer) is nn.Linear and not module.fan_in_fan_out
            and not module.base_layer.weight.requires_grad)


def fuse_lora_layers(model: nn.Module) -> int:
    """Give each fusable LoRA linear layer of `model` the fused forward; how many there were."""
    count = 0
    for module in model.modules():
        if fusable(module):
            module.forward = MethodType(fused_forward, module)
            count += 1
    return count


def all_fusable(model: nn.Module) -> bool:
    """Whether every PEFT LoRA layer of `model` is fusable."""
    from peft.tuners.lora.layer import LoraLayer

    return all(fusable(module) for module in model.modules() if isinstance(module, LoraLayer))
