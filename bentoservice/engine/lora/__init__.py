"""Batched LoRA: every loaded adapter's A and B stacked per layer, chosen per token by a mask.

Tokens of one forward pass may each use a different adapter (slot 0 is the bare base, which has no
stack entry), so requests for different adapters share one batch without cross-talk. A mixed batch
runs two dense products over the concatenated ranks of all stacked adapters, with a per-token 0/1
mask between them that keeps each token's own adapter: no per-token gather of weights, and fixed
shapes, so the step can be captured in a CUDA graph. The scaling factor is folded into B at load time.

On a CPU (the lean pass, `LoraGroup`) a batch instead groups its tokens by adapter, so that each token
computes only its own adapter (the mask's products compute every adapter for every token, which there costs
as much time as it costs FLOPs): in one call of the compiled kernel (`native`) per group of layers, or,
where it cannot be built, as batched torch products, one batch entry per adapter.

One interface, one backend per device: `LoraBatch` (batch.py) holds the slot of each token of the pass under way
and is shared by every wrapped layer; `BatchedLoraLinear` (gpu.py) is the stacked, masked path, `LoraGroup`
(cpu.py) the grouped path of the CPU's lean pass, which reads `BatchedLoraLinear`'s stacks.
"""

from bentoservice.engine.lora.batch import LoraBatch, tokens_by_slot
from bentoservice.engine.lora.cpu import LoraGroup
from bentoservice.engine.lora.gpu import BatchedLoraLinear

__all__ = ["BatchedLoraLinear", "LoraBatch", "LoraGroup", "tokens_by_slot"]
