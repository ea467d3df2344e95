"""Training passes replayed as CUDA graphs.

On the H100 machine the host takes 30-60 us to launch each kernel and a pass issues thousands of them: a pass of
the 8B shape with 2,000 tokens kept the GPU busy 31% of its time (docs/benchmarks.md). Replaying a captured graph
launches all of a pass's kernels at once, so passes can be small, and their activations with them, while the GPU
stays busy.

The decoder (embeddings, layers, final norm) is captured, its forward and its backward, for each of a few buckets
of token counts, all at the first pass. A pass is padded to its bucket with one more sequence (attended alone, and
its outputs' gradients are zero, so it adds nothing to the LoRA gradients), and `cu_seq_lens` to a fixed length with
empty sequences. The backward graph adds the LoRA weights' gradients into their `.grad`, which are views of one
buffer that stays put (a graph writes fixed addresses). The LM head and the loss run outside the graph, as before.

The buckets' graphs share one memory pool: one bucket's forward and backward run before another's starts, and
their outputs are read as soon as they are written, so they can reuse each other's memory.

A capture cannot wait on another stream: a pass's autograd graph kept alive into the next pass (a loss not let go)
keeps the LoRA weights' gradient accumulators on the stream they were made on, and the capture fails.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from types import MethodType
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.modeling_outputs import BaseModelOutputWithPast

log = logging.getLogger(__name__)

# Passes are padded up to one of at most BUCKETS sizes, multiples of GRANULARITY tokens: few graphs to capture,
# little padding.
BUCKETS = 16
GRANULARITY = 128
# Outputs a graphed pass does not give: a call that asks for them runs eagerly.
EXTRA_OUTPUTS = ("output_attentions", "output_hidden_states")
# The decoder's keyword arguments a graphed pass takes (TRL's padding-free collator's); others run eagerly.
PASS_KWARGS = {
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "seq_idx",
    "return_dict",
    *EXTRA_OUTPUTS,
}


@dataclass
class Bucket:
    """One captured pair of graphs, for passes of up to `tokens` tokens; its static inputs and outputs are the
    first `tokens` of buffers that all buckets share."""

    tokens: int
    ids: torch.Tensor  # [1, tokens]
    positions: torch.Tensor  # [1, tokens]
    bounds: torch.Tensor  # [sequences + 2] int32: where each sequence starts, then the end
    hidden: torch.Tensor  # [1, tokens, hidden]: the forward graph's output
    grad: torch.Tensor  # [1, tokens, hidden]: the gradient of `hidden` the backward graph reads
    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph

    def fill(self, ids: torch.Tensor, positions: torch.Tensor, bounds: torch.Tensor) -> None:
        """Copy a pass into the static inputs, padded with one sequence of the bucket's left-over tokens."""
        tokens, count = ids.shape[1], bounds.numel()
        self.ids[:, :tokens].copy_(ids)
        self.positions[:, :tokens].copy_(positions)
        self.positions[:, tokens:].copy_(torch.arange(self.tokens - tokens, device=ids.device))
        self.bounds[:count].copy_(bounds)
        self.bounds[count:].fill_(self.tokens)


class _Replay(torch.autograd.Function):
    """The decoder's output for a filled bucket; its backward replays the backward graph."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, bucket: Bucket, tokens: int) -> torch.Tensor:
        bucket.forward.replay()
        ctx.bucket, ctx.tokens = bucket, tokens
        return bucket.hidden[:, :tokens].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        bucket, tokens = ctx.bucket, ctx.tokens
        bucket.grad[:, :tokens].copy_(grad)
        bucket.grad[:, tokens:].zero_()
        bucket.backward.replay()
        return None, None, None


class GraphedDecoder:
    """Replaces a decoder's forward: padding-free training passes replay captured graphs, anything else runs
    the decoder's own forward."""

    def __init__(
        self, decoder: nn.Module, params: list[nn.Parameter], sequences: int, max_tokens: int, longest: int
    ) -> None:
        self.decoder, self.eager = decoder, decoder.forward
        self.params = params
        self.sequences = sequences  # the most examples a pass may hold
        self.max_tokens = max_tokens
        device = params[0].device
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=device)
        self.grads = [g.view_as(p) for g, p in zip(self.flat.split([p.numel() for p in params]), params, strict=True)]
        self.pool = torch.cuda.graph_pool_handle()
        self.buckets: dict[int, Bucket] = {}
        # The buckets' static inputs and outputs, views of these (the outputs are made at the first capture).
        self.step = GRANULARITY * math.ceil(max_tokens / (BUCKETS * GRANULARITY))
        largest = self.step * math.ceil(max_tokens / self.step)
        # The longest sequence a pass may hold, the padding one included: flash attention's grid is as long as this.
        self.longest = max(longest, self.step)
        self.ids = torch.zeros(1, largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(1, largest, dtype=torch.long, device=device)
        self.bounds = torch.zeros(sequences + 2, dtype=torch.int32, device=device)
        self.hidden: torch.Tensor | None = None
        self.grad: torch.Tensor | None = None
        log.info("training passes of up to %d tokens and %d examples replay CUDA graphs", max_tokens, sequences)
        decoder.forward = MethodType(GraphedDecoder.forward, self)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        bounds, max_length = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q", 0)
        if not (
            self.decoder.training
            and torch.is_grad_enabled()
            and input_ids is not None
            and input_ids.shape[0] == 1
            and position_ids is not None
            and bounds is not None
            and attention_mask is None
            and past_key_values is None
            and inputs_embeds is None
            and not use_cache
            and set(kwargs) <= PASS_KWARGS
            and not any(kwargs.get(name) for name in EXTRA_OUTPUTS)
            and bounds.numel() <= self.sequences + 1
            and input_ids.shape[1] <= self.max_tokens
            and max_length <= self.longest
        ):
            return self.eager(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        tokens = input_ids.shape[1]
        bucket = self._bucket(self.step * math.ceil(tokens / self.step))
        bucket.fill(input_ids, position_ids, bounds)
        self._own_grads()
        return BaseModelOutputWithPast(last_hidden_state=_Replay.apply(self.params[0], bucket, tokens))

    def release(self) -> None:
        """Give back the graphs and their memory: the decoder runs its own forward again."""
        self.decoder.forward = self.eager
        self.buckets.clear()
        self.hidden = self.grad = None

    def _own_grads(self) -> None:
        """Make the parameters' `.grad` the views the backward graph adds into, keeping what they hold (the
        trainer sets them to None after each optimizer step)."""
        if all(p.grad is g for p, g in zip(self.params, self.grads, strict=True)):
            return
        cleared = all(p.grad is None for p in self.params)
        if cleared:
            self.flat.zero_()  # one kernel, not one a parameter
        for p, g in zip(self.params, self.grads, strict=True):
            if p.grad is not g:
                if p.grad is not None:
                    g.copy_(p.grad)
                elif not cleared:
                    g.zero_()
                p.grad = g

    def _bucket(self, tokens: int) -> Bucket:
        if not self.buckets:
            self._capture_all()
        return self.buckets[tokens]

    def _capture_all(self) -> None:
        """Capture every bucket at the first pass, the largest first (the memory pool grows once), so that no step
        after the first waits for a capture."""
        start = time.perf_counter()
        for tokens in range(self.ids.shape[1], 0, -self.step):
            self.buckets[tokens] = self._capture(tokens)
        log.info(
            "captured the training pass for %d to %d tokens in %.0f s",
            self.step,
            self.ids.shape[1],
            time.perf_counter() - start,
        )

    def _capture(self, tokens: int) -> Bucket:
        device = self.params[0].device
        ids, positions = self.ids[:, :tokens], self.positions[:, :tokens]
        ids.zero_()
        # Sequences of the longest length a pass may hold (their contents do not matter, only the kernels launched).
        positions.copy_(torch.arange(tokens, device=device) % self.longest)
        starts = torch.arange(0, tokens, self.longest, dtype=torch.int32)
        self.bounds.fill_(tokens)
        self.bounds[: starts.numel()] = starts
        autocast = {"enabled": torch.is_autocast_enabled("cuda"), "dtype": torch.get_autocast_dtype("cuda")}

        def run() -> torch.Tensor:
            # The autocast cache would keep casts made during capture outside the graph's memory.
            with torch.autocast("cuda", **autocast, cache_enabled=False):
                return self.eager(
                    input_ids=ids,
                    position_ids=positions,
                    cu_seq_lens_q=self.bounds,
                    cu_seq_lens_k=self.bounds,
                    max_length_q=self.longest,
                    max_length_k=self.longest,
                    use_cache=False,
                ).last_hidden_state

        # Warm-up on a side stream, as capture requires (lazy initialisation, Triton's autotuning).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            hidden = run()
            torch.autograd.grad(hidden, self.params, torch.ones_like(hidden))
        torch.cuda.current_stream().wait_stream(stream)
        if self.hidden is None or self.grad is None:
            self.hidden = hidden.new_empty(1, self.ids.shape[1], hidden.shape[-1])
            self.grad = torch.zeros_like(self.hidden)
        del hidden
        out, grad = self.hidden[:, :tokens], self.grad[:, :tokens]
        forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(forward, pool=self.pool):
            hidden = run()
            out.copy_(hidden)
        with torch.cuda.graph(backward, pool=self.pool):
            torch._foreach_add_(self.grads, torch.autograd.grad(hidden, self.params, grad))
        return Bucket(tokens, ids, positions, self.bounds, out, grad, forward, backward)


class ReleaseAtTheEnd(TrainerCallback):
    """Releases the graphs when training ends, before the final evaluation (eager, and wanting the memory)."""

    def __init__(self, graphed: GraphedDecoder) -> None:
        self.graphed = graphed

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.graphed.release()


def graphable(model: nn.Module) -> bool:
    """Whether `model`'s (PEFT's model's) passes can be graphed: every LoRA layer a fusable one (quantized base
    layers' kernels are not known to be capturable) and the trained weights of one dtype (one gradient buffer)."""
    from bentoservice.training.speed.fused_lora import all_fusable

    return all_fusable(model) and len({p.dtype for p in model.parameters() if p.requires_grad}) == 1


def graph_decoder(model: nn.Module, sequences: int, max_tokens: int, longest: int) -> GraphedDecoder:
    """Replay `model`'s (PEFT's model's, `graphable`) decoder passes as CUDA graphs, for passes of up to
    `sequences` examples and `max_tokens` tokens, of examples of up to `longest`."""
    params = [p for p in model.parameters() if p.requires_grad]
    return GraphedDecoder(model.get_base_model().base_model, params, sequences, max_tokens, longest)
