"""The fast SFT path: the plan, the trainer subclass, passes, varlen attention, fused kernels, CUDA graphs."""
