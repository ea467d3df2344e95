"""bentoservice: fine-tune open LLMs with LoRA and serve them OpenAI-compatible on BentoML."""


def __getattr__(name: str) -> object:
    # AutoLLM pulls in torch and transformers: import it only when asked for.
    if name == "AutoLLM":
        from bentoservice.training.auto import AutoLLM

        return AutoLLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
