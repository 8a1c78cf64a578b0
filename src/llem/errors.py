"""The few errors that callers really tell apart.

Every library error derives from :class:`LlemError`; the CLI turns it into ``Error: ...`` on
stderr with exit status 1 in one place.
"""


class LlemError(Exception):
    """Base class of every error llem raises on purpose."""


class ConfigError(LlemError):
    """The configuration file or an ``LLEM_*`` override is invalid."""


class SensorUnavailable(LlemError):
    """The hardware or driver behind a sensor is not present on this node (not a fault)."""


class SensorPermissionError(LlemError):
    """The counter exists but this process may not read it."""


class SensorReadError(LlemError):
    """The counter exists but a read failed or returned garbage."""


class StoreError(LlemError):
    """The node store cannot be opened, migrated or written."""


class LedgerError(LlemError):
    """The cluster ledger cannot be opened, read or merged into."""
