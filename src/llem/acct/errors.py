"""The one error of :mod:`llem.acct`'s parsing: a bad value on the command line."""

from __future__ import annotations


class AcctUsageError(ValueError):
    """A bad value on the command line (becomes a usage error, exit status 2).

    Attributes:
        option: the option the value belongs to, e.g. ``-o/--format``.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option
