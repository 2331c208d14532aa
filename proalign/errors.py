"""Errors about a user's input or run (bad data, a diverged run, a stale cache): the CLI prints
their message alone, without a traceback, and exits 1."""


class ProalignError(Exception):
    """Base of the errors whose message says everything a user needs."""
