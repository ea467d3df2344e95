"""bentoservice: fine-tune open LLMs with LoRA and serve them OpenAI-compatible on BentoML."""

_LAZY = {"AutoLLM": "bentoservice.training.auto", "Client": "bentoservice.client"}


def __getattr__(name: str) -> object:
    # AutoLLM pulls in torch and transformers, Client the openai SDK: import them only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
