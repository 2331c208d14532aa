"""Errors about a user's input or run (bad data, a diverged run, a stale cache): the CLI prints
their message alone, without a traceback, and exits 1 (2 for a config error)."""


class ProalignError(Exception):
    """Base of the errors whose message says everything a user needs."""


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the field."""


class NonFiniteLossError(ProalignError, RuntimeError):
    """A run whose losses or weights became NaN or infinite (its model is not exported)."""
