"""User-facing errors: each carries a one-line message that the CLI, TUI and server show as is.

Anything derived from :class:`PicochatError` is the user's problem (bad input, missing model,
full queue) and is reported without a traceback; anything else is a bug.
"""


class PicochatError(Exception):
    """Base class: ``str(err)`` is a complete one-line message for the user."""


class ConfigError(PicochatError):
    """An impossible or invalid setting."""


class ModelLoadError(PicochatError):
    """A missing, truncated or corrupt model file, or an unsupported architecture."""


class PromptTooLongError(PicochatError):
    """The prompt (plus at least one generated token) does not fit the context or KV pool."""


class QueueFullError(PicochatError):
    """Too many requests are waiting; retry later."""


class EngineClosedError(PicochatError):
    """The engine was shut down."""
