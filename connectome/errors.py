"""Error type shared by every dmn-neuro package.

Anything raised as :class:`DMNError` is a problem with the user's input or
environment (a missing file, a malformed table, an unknown layer, NaN weights,
a corrupt checkpoint, a missing Lava env). The CLI prints its message as one
line and exits non-zero; it never shows a traceback for these.
"""


class DMNError(Exception):
    """A user-facing error whose message is one line naming the problem."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class DataError(DMNError, ValueError):
    """Malformed or missing connectome / odor data."""


class ConfigError(DMNError, ValueError):
    """A bad configuration value or file."""
