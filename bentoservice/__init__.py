"""bentoservice: fine-tune open LLMs with LoRA and serve them OpenAI-compatible on BentoML."""
