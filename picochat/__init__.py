"""picochat: a terminal chat and operations console with its own LLM inference engine."""

__version__ = "0.1.0"
