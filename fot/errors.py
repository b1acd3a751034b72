"""ConfigError, in a module of its own so that the tokenizers and the task generators that the
config validates with can raise it without importing the config."""


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names key and file."""
