"""What the engine refuses, as exceptions the API layer maps to HTTP errors (no torch here)."""


class EngineError(Exception):
    pass


class UnknownModel(EngineError, LookupError):
    """A request named a model that is neither the base, `<base>:base`, nor a loaded adapter."""


class UnknownAdapter(EngineError, LookupError):
    pass


class AdapterError(EngineError, ValueError):
    """An adapter that cannot be loaded; the message says why."""


class ContextOverflow(EngineError, ValueError):
    pass


class Overloaded(EngineError, RuntimeError):
    """More requests than max_running + max_queued."""


class GrammarError(EngineError, ValueError):
    """A grammar (JSON schema, regex, EBNF) the grammar engine cannot compile; the message says why."""
