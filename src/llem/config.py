"""Configuration: YAML file -> frozen dataclass.

Every key has a default, so no file is needed. The file is ``/etc/llem/llem.yaml`` or the one
named by ``LLEM_CONFIG``; ``LLEM_<SECTION>_<KEY>`` environment variables override single keys
(``LLEM_SAMPLER_INTERVAL_S=1``). Unknown keys are rejected with the nearest valid name.

PyYAML is imported only when a file is actually read: the Prolog and sampler paths must start
fast on nodes that run on defaults.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from llem.errors import ConfigError


class SecretUnavailable(ConfigError):
    """A secret file that this user may not read (it is for root and admins): not a fault;
    what needs it is skipped, and said."""


DEFAULT_CONFIG_PATH = Path("/etc/llem/llem.yaml")

# Environment variables that start with LLEM_ but are not config keys.
NON_KEY_ENV = frozenset(
    {
        "LLEM_CONFIG",
        "LLEM_POWERCAP_ROOT",
        "LLEM_HWMON_ROOT",
        "LLEM_SHARE_DIR",
        "LLEM_DEBUG",
        "LLEM_PM_COUNTERS_ROOT",
        "LLEM_HISTORY",  # the Python API's local history (llem.history)
        # read by the Slurm hook scripts (slurm/llem-hook.sh), not by llem itself
        "LLEM_BIN",
        "LLEM_TIMEOUT",
        "LLEM_DEFAULTS_FILE",
    }
)

MIN_INTERVAL_S = 0.1


@dataclass(frozen=True)
class SamplerConfig:
    interval_s: float = 10.0
    """Seconds between two reads of every sensor (0.1 at least; RAPL needs a few seconds)."""
    linger_s: float = 600.0
    """How long the node sampler stays up after its last job is gone (it keeps measuring the
    idle node meanwhile, and later jobs start without paying for its start-up)."""
    nice: int = 10
    """Niceness the sampler sets for itself so that it never competes with jobs."""


@dataclass(frozen=True)
class EstimateConfig:
    cpu_tdp_w: float | None = None
    """TDP of one CPU package in watts; None looks the CPU model up in share/cpu_tdp.csv."""
    cpu_idle_fraction: float = 0.3
    """Share of TDP drawn by an idle package (methodology.md gives the basis)."""
    memory_w_per_gb: float = 0.3725
    """DRAM power per GB in use (Green Algorithms' figure)."""


@dataclass(frozen=True)
class CarbonConfig:
    region: str | None = None
    """Grid region for the intensity table (ISO country, US-XX, eGRID, cloud region)."""
    pue: float | dict[str, float] = 1.0
    """Power usage effectiveness: a constant, or a mapping of 'YYYY-MM' to a value."""
    intensity_file: str | None = None
    """CSV of hourly intensity (UTC timestamp, gCO2e/kWh, optional region)."""
    intensity_g_per_kwh: float | None = None
    """A constant intensity that overrides the tables (source: 'configured constant')."""
    provider: str | None = None
    """Optional online provider: 'electricitymaps' or 'uk-carbon-intensity'; off by default."""
    provider_token: str | None = None
    """Token of the online provider, where it needs one. Better kept out of the config file
    (which every user reads): see provider_token_file."""
    provider_token_file: str | None = None
    """A file holding the provider's token (its first line), readable by root (and an admin
    group) only, never by others; read only when a provider request is made. Users, who may
    not read it, get the annual table instead, and are told so."""
    intensity_basis: str | None = None
    """Basis of intensity_file or intensity_g_per_kwh: 'lifecycle' or 'direct' (None: shown
    as 'unspecified'). Shipped tables and providers carry their own basis."""
    provider_zone: str | None = None
    """The provider's zone (Electricity Maps, e.g. 'DE' or 'US-CAL-CISO'); default: region."""
    provider_url: str | None = None
    """Base URL of the provider's API (a mirror or proxy); default: the provider's own."""
    provider_timeout_s: float = 10.0
    """Time-out of one provider request; on time-out the annual table is used, and said."""

    def token(self) -> str | None:
        """The provider's token: ``provider_token``, else the first line of
        ``provider_token_file`` (see :func:`read_secret`); None when neither is set.

        Raises:
            SecretUnavailable: this user may not read the file (a user, not an admin).
            ConfigError: the file is readable or writable by others, or (as root) owned by
                another user.
        """
        if self.provider_token:
            return self.provider_token
        if not self.provider_token_file:
            return None
        return read_secret(self.provider_token_file, "carbon.provider_token_file")


@dataclass(frozen=True)
class EmbodiedConfig:
    enabled: bool = False
    gpu_kgco2e: float = 150.0
    gpu_lifetime_years: float = 6.0
    node_kgco2e: float = 2500.0
    node_lifetime_years: float = 6.0


@dataclass(frozen=True)
class AggregateConfig:
    grace_s: float = 3600.0
    """How long a job waits for its missing nodes before it is marked incomplete."""
    processed: str = "archive"
    """What becomes of merged slices: 'archive' (moved under archive_dir) or 'delete'."""
    archive_dir: str | None = None
    """Where merged slices go (default SPOOL_DIR/archive)."""
    quarantine_dir: str | None = None
    """Where bad slices go (default SPOOL_DIR/quarantine)."""
    outbox_dir: str | None = None
    """Node-local folder of slices waiting for the spool (default STATE_DIR/outbox)."""
    node_retention_days: float = 30.0
    """Node stores drop sealed, exported data older than this."""
    header_owners: str = "slurm"
    """Users besides root (names or uids, comma-separated) whose job header slices the
    aggregator accepts: EpilogSlurmctld runs as SlurmctldUser."""
    batch_size: str | int = "auto"
    """Slices merged per ledger transaction: 'auto' (500 on SQLite, where short transactions
    keep readers and crashes cheap; 2000 on PostgreSQL, whose server spends less per slice in
    larger transactions) or a number."""
    readers: str | int = "auto"
    """Processes that read and check slices while the aggregator writes the ledger: 'auto'
    (one fewer than the CPUs, at most 4, none for a small pass) or a number (0: none)."""
    ledger_group: str | None = "llem"
    """The group that may read the ledger (mode 0640; 0644 with privacy 'none'): the
    gateway's user and admins. A group that does not exist leaves the file's group as is."""
    sacct: str = "auto"
    """Slurm's accounting as the authority for job states: 'auto' (sacct from PATH, when
    there is one), 'off', or the absolute path of sacct (docs/ledger.md, Slurm's accounting)."""
    sacct_batch: int = 200
    """Jobs asked about per sacct call."""
    sacct_timeout_s: float = 30.0
    """Time all sacct calls of one pass may take together; the rest waits for the next pass."""
    sacct_settle_s: float = 60.0
    """How long after a job's end it is first asked about (slurmdbd records ends late)."""


@dataclass(frozen=True)
class GatewayConfig:
    socket: str = "/run/llem-gateway/gateway.sock"
    """The gateway's Unix socket on the ledger host (clients identified by SO_PEERCRED)."""
    listen: str | None = None
    """HOST:PORT for remote clients (a MUNGE credential per request); None: no TCP."""
    admins: str = ""
    """Users (names or uids, comma-separated) who see every job, besides root and
    slurm_user."""
    admin_groups: str = ""
    """Groups (comma-separated) whose members see every job."""
    slurm_user: str = "slurm"
    """SlurmUser: sees every job, as in Slurm."""
    coordinators: dict[str, tuple[str, ...]] | None = None
    """Account -> users who see that account's jobs and totals."""
    coordinators_from_slurm: bool = False
    """Also ask Slurm (sacctmgr, cached 5 minutes) who coordinates which account."""
    munge_socket: str = "/run/munge/munge.socket.2"
    """munged's socket (client and gateway)."""
    query_timeout_s: float = 60.0
    """A query running longer is stopped and the client told to narrow it."""


@dataclass(frozen=True)
class MetricsConfig:
    textfile_dir: str | None = None
    """node_exporter's textfile directory: the node sampler writes llem_node_NODE.prom there
    every interval (docs/metrics.md); None: off. It must be root's, not writable by others."""
    dcgm_job_mapping_dir: str | None = None
    """The directory dcgm-exporter's --hpc-job-mapping-dir reads (one file per GPU index,
    listing its running jobs); None: off."""


@dataclass(frozen=True)
class AttributionConfig:
    policy: str = "hybrid"
    """How CPU and DRAM energy of shared nodes is split: 'hybrid' (idle power by allocation,
    the rest by use), 'use' or 'allocation'. A job holding the whole node gets all of it."""
    idle_w: dict[str, float] | None = None
    """Idle power in watts per component ('cpu', 'dram') or device key; default: learned by
    the node sampler, else the estimate model's (docs/methodology.md)."""


@dataclass(frozen=True)
class IpmiConfig:
    enabled: bool = False
    """Read the node's power from its BMC over IPMI DCMI (sensor 'ipmi'), where no other node
    meter (pm_counters, an ACPI power meter) is found; needs root and a DCMI BMC."""
    tool: str = "auto"
    """'auto' (FreeIPMI's ipmi-dcmi, else ipmitool), 'ipmi-dcmi' or 'ipmitool'."""
    args: str = ""
    """Arguments put before the tool's command (shell words), e.g. a LAN BMC's
    '-I lanplus -H bmc1 -U llem -f /etc/llem/bmc.pass'; empty: the local BMC (in-band)."""
    poll_s: float = 1.0
    """Seconds between two BMC reads, in a thread of the sampler (never in its tick)."""
    timeout_s: float = 10.0
    """A BMC read that takes longer is killed, and the node meter has a gap."""


@dataclass(frozen=True)
class Config:
    cluster: str = "default"
    """Cluster name; Slurm's SLURM_CLUSTER_NAME wins inside jobs."""
    state_dir: str = "/var/lib/llem"
    """Node-local directory of the node store (root-owned)."""
    spool_dir: str = "/var/spool/llem"
    """Shared directory where epilogs drop finished jobs' slices."""
    ledger: str = "/var/lib/llem/ledger.db"
    """The cluster ledger: a path (SQLite), a PostgreSQL ``postgresql://`` URL or
    ``service=NAME`` (never with a password), or the gateway: llem://HOST[:PORT] or its
    socket's path."""
    privacy: str = "jobs,usage"
    """Like Slurm's PrivateData=jobs,usage, enforced by the gateway: users see their own jobs,
    coordinators their accounts', admins all; 'none': everyone sees everything."""
    ledger_retention_months: int | None = None
    """PostgreSQL ledger: whole months of hourly energy rows kept (older month partitions are
    dropped after each merge pass); None keeps everything."""
    run_dir: str = "/run/llem"
    """Node-local runtime folder: the sampler's lock, pid file and the socket of `llem wrap`."""
    sensors: str | tuple[str, ...] = "auto"
    """'auto', or a list of sensor names among 'rapl', 'nvml', 'estimate', 'pm_counters',
    'hwmon', 'amdsmi', 'ipmi' ('auto' reads the BMC only with ipmi.enabled)."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    embodied: EmbodiedConfig = field(default_factory=EmbodiedConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    ipmi: IpmiConfig = field(default_factory=IpmiConfig)
    source: str = "defaults"
    """Where this configuration came from (a path, or 'defaults'); not a key."""


SENSOR_NAMES = ("rapl", "nvml", "estimate", "pm_counters", "hwmon", "amdsmi", "ipmi")
CHOICES = {
    "aggregate.processed": ("archive", "delete"),
    "attribution.policy": ("hybrid", "use", "allocation"),
    "privacy": ("jobs,usage", "none"),
    "ipmi.tool": ("auto", "ipmi-dcmi", "ipmitool"),
}
_SECTIONS = {
    "sampler": SamplerConfig,
    "estimate": EstimateConfig,
    "carbon": CarbonConfig,
    "embodied": EmbodiedConfig,
    "aggregate": AggregateConfig,
    "metrics": MetricsConfig,
    "attribution": AttributionConfig,
    "gateway": GatewayConfig,
    "ipmi": IpmiConfig,
}
_TOP_KEYS = tuple(f.name for f in fields(Config) if f.name != "source")


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``sampler.interval_s``."""
    keys = []
    for name in _TOP_KEYS:
        if name in _SECTIONS:
            keys += [f"{name}.{f.name}" for f in fields(_SECTIONS[name])]
        else:
            keys.append(name)
    return keys


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def _check_type(key: str, value: Any, annotation: str, where: str) -> Any:
    """Validate one value against the field's annotation (kept as a string)."""
    if value is None:
        if "None" in annotation:
            return None
        raise ConfigError(f"{where}: '{key}' may not be empty")
    if key in _SPECIAL_KEYS:
        return _SPECIAL_KEYS[key](value, where)
    for prefix, check in _BY_TYPE:
        if annotation.startswith(prefix):
            return check(key, value, where)
    return value


def _check_sensors(value: Any, where: str) -> Any:
    if value == "auto":
        return value
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ConfigError(f"{where}: 'sensors' must be 'auto' or a list of sensor names")
    for s in items:
        if s not in SENSOR_NAMES:
            raise _unknown_sensor(s, where)
    return tuple(items)


def _check_readers(value: Any, where: str) -> Any:
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"{where}: 'aggregate.readers' must be 'auto' or a whole number "
            f"of processes (0 or more), got {value!r}"
        )
    return value


def _check_batch_size(value: Any, where: str) -> Any:
    if value == "auto":
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"{where}: 'aggregate.batch_size' must be 'auto' or a whole number "
            f"of slices (1 or more), got {value!r}"
        )
    return value


def _check_pue(value: Any, where: str) -> Any:
    """A constant PUE, or one per month (``{"2026-01": 1.3, ...}``)."""
    key = "carbon.pue"
    if not isinstance(value, dict):
        return _check_float(key, value, where)
    out = {}
    for month, pue in value.items():
        month = str(month)
        if len(month) != 7 or month[4] != "-" or not (month[:4] + month[5:]).isdigit():
            raise ConfigError(f"{where}: 'carbon.pue' month '{month}' is not YYYY-MM")
        out[month] = _number(key, pue, where)
        _check_range(key, out[month], where)
    return out


def _check_idle_w(value: Any, where: str) -> dict[str, float]:
    """Idle watts per component or device key (``{cpu: 30, "rapl:dram-0": 2}``)."""
    key = "attribution.idle_w"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must map components or device keys to watts")
    out = {}
    for name, watts in value.items():
        out[str(name)] = _number(key, watts, where)
        _check_range(key, out[str(name)], where)
    return out


def _check_coordinators(value: Any, where: str) -> dict[str, tuple[str, ...]]:
    """Account -> coordinators (``{physics: [alice, carol]}`` or ``{physics: "alice,carol"}``)."""
    key = "gateway.coordinators"
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: '{key}' must map accounts to lists of users")
    out = {}
    for account, users in value.items():
        if isinstance(users, str):
            users = [u for u in users.split(",")]
        if not isinstance(users, list) or not all(isinstance(u, (str, int)) for u in users):
            raise ConfigError(f"{where}: '{key}.{account}' must be a list of users")
        out[str(account)] = tuple(str(u).strip() for u in users if str(u).strip())
    return out


def _check_int(key: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
    return value


def _check_float(key: str, value: Any, where: str) -> float:
    number = _number(key, value, where)
    _check_range(key, number, where)
    return number


def _check_bool(key: str, value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
    return value


def _check_str(key: str, value: Any, where: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
    if key in CHOICES and str(value) not in CHOICES[key]:
        raise ConfigError(
            f"{where}: '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}"
        )
    return str(value)


def _check_sacct(value: Any, where: str) -> str:
    if not isinstance(value, str) or not (value in ("auto", "off") or value.startswith("/")):
        raise ConfigError(
            f"{where}: 'aggregate.sacct' must be 'auto', 'off' or an absolute path, got {value!r}"
        )
    return value


_SPECIAL_KEYS = {
    "sensors": _check_sensors,
    "aggregate.sacct": _check_sacct,
    "aggregate.readers": _check_readers,
    "aggregate.batch_size": _check_batch_size,
    "carbon.pue": _check_pue,
    "attribution.idle_w": _check_idle_w,
    "gateway.coordinators": _check_coordinators,
}
"""Keys whose values are more than their annotation says."""
_BY_TYPE = (
    ("float", _check_float),
    ("int", _check_int),
    ("bool", _check_bool),
    ("str", _check_str),
)
"""Checks by the annotation's first type, in this order."""


def _unknown_sensor(name: str, where: str) -> ConfigError:
    near = difflib.get_close_matches(name, SENSOR_NAMES, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(
        f"{where}: unknown sensor '{name}' in 'sensors' (valid: {', '.join(SENSOR_NAMES)}){hint}"
    )


def _number(key: str, value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}") from None


def _check_range(key: str, value: float, where: str) -> None:
    if value != value or value in (float("inf"), float("-inf")):
        raise ConfigError(f"{where}: '{key}' must be a finite number")
    if key == "sampler.interval_s" and value < MIN_INTERVAL_S:
        raise ConfigError(f"{where}: 'sampler.interval_s' must be at least {MIN_INTERVAL_S} s")
    if key == "carbon.pue" and value < 1.0:
        raise ConfigError(f"{where}: 'carbon.pue' must be at least 1.0, got {value}")
    if key == "estimate.cpu_idle_fraction" and not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}: 'estimate.cpu_idle_fraction' must be between 0 and 1")
    if key in ("ipmi.poll_s", "ipmi.timeout_s") and value < MIN_INTERVAL_S:
        raise ConfigError(f"{where}: '{key}' must be at least {MIN_INTERVAL_S} s")
    if value < 0:
        raise ConfigError(f"{where}: '{key}' may not be negative, got {value}")


def _annotations(cls) -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(cls)}


def from_mapping(data: Mapping[str, Any], where: str = "config") -> Config:
    """Build a Config from a parsed mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: the top level must be a mapping of keys to values")
    top = _annotations(Config)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key not in _TOP_KEYS:
            raise _unknown(key, all_keys() + list(_SECTIONS), where)
        if key not in _SECTIONS:
            kwargs[key] = _check_type(key, value, top[key], where)
            if key == "cluster":
                _check_cluster_name(kwargs[key], where)
        elif value is not None:  # an empty section keeps its defaults
            kwargs[key] = _section(key, value, where)
    return Config(**kwargs, source=where)


def _check_cluster_name(name: str, where: str) -> None:
    """The cluster name names files and rows: the one rule for identifiers (issue 20)."""
    from llem.slices import SliceError, check_identifier

    try:
        check_identifier("'cluster'", name)
    except SliceError as e:
        raise ConfigError(f"{where}: {e}") from None


def _section(name: str, data: Any, where: str) -> Any:
    """One section (``sampler:``, ``carbon:``, ...) as its dataclass."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: '{name}' must be a mapping of keys to values")
    cls = _SECTIONS[name]
    sub = _annotations(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{name}.{key}"
        if key not in sub:
            raise _unknown(dotted, all_keys(), where)
        kwargs[key] = _check_type(dotted, value, sub[key], where)
    return cls(**kwargs)


def _parse_yaml(text: str, where: str) -> Any:
    import yaml  # only when a file exists: keeps the default start-up path light

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = ""
        if e.context and e.context_mark is not None and e.context_mark is not mark:
            context = f" ({e.context} that starts at line {e.context_mark.line + 1})"
        raise ConfigError(f"{where}: malformed YAML{pos}: {e.problem or e}{context}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: malformed YAML: {e}") from e


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Turn LLEM_<KEY> variables into a nested mapping of raw values (YAML scalars)."""
    by_env = {"LLEM_" + k.upper().replace(".", "_"): k for k in all_keys()}
    out: dict[str, Any] = {}
    for name, raw in env.items():
        if not name.startswith("LLEM_") or name in NON_KEY_ENV:
            continue
        key = by_env.get(name)
        if key is None:
            near = difflib.get_close_matches(name, list(by_env), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise ConfigError(f"environment: unknown variable {name}{hint}")
        value: Any = raw
        if key == "sensors" and raw != "auto":
            value = [s.strip() for s in raw.split(",") if s.strip()]
        elif key in ("embodied.enabled", "ipmi.enabled"):
            value = raw.strip().lower() in ("1", "true", "yes", "on")
        elif key in ("sampler.nice",):
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"environment: {name} must be an integer, got {raw!r}") from None
        if "." in key:
            section, sub = key.split(".", 1)
            out.setdefault(section, {})[sub] = value
        else:
            out[key] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env["LLEM_CONFIG"]) if env.get("LLEM_CONFIG") else DEFAULT_CONFIG_PATH


def load(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load the configuration in effect.

    Args:
        path: a YAML file; default ``$LLEM_CONFIG`` or ``/etc/llem/llem.yaml``. An explicitly
            named file (argument or LLEM_CONFIG) must exist; the default one may be absent.
        env: the environment for ``LLEM_*`` overrides (default ``os.environ``).

    Raises:
        ConfigError: unreadable or malformed file, unknown key, wrong type or range.
    """
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get("LLEM_CONFIG"))
    file = Path(path) if path is not None else config_path(env)
    data: dict[str, Any] = {}
    where = "defaults"
    text = _read_config_file(file, explicit)
    if text is not None:
        where = str(file)
        data = _parse_file(text, where)
    overrides = _env_overrides(env)
    if overrides:
        from_mapping(overrides, "environment")
        data = _merge(data, overrides)
        where = f"{where} + environment" if where != "defaults" else "defaults + environment"
    config = from_mapping(data, where)
    if config.carbon.provider_token and text is not None and os.geteuid() == 0:
        _warn_inline_secret(file)
    return config


def _warn_inline_secret(file: Path) -> None:
    import logging
    import stat

    try:
        if os.stat(file).st_mode & stat.S_IROTH:
            logging.getLogger(__name__).warning(
                "%s: carbon.provider_token sits in a config file every user can read; move "
                "it to carbon.provider_token_file (mode 0600)",
                file,
            )
    except OSError:
        pass


def _read_config_file(file: Path, explicit: bool) -> str | None:
    """The file's text; None when the default file is absent (an explicit one must exist).

    As root, the file actually opened must be owned by root and writable by no one else
    (see :func:`trust_problem`): what it says, root does (paths it writes, hooks it runs).
    """
    try:
        with open(file, "rb") as f:
            problem = trust_problem(os.fstat(f.fileno())) if os.geteuid() == 0 else None
            if problem is not None:
                raise ConfigError(
                    f"{file}: the config file {problem}; llem runs as root "
                    "and refuses a file another user could have written "
                    "(fix with 'chown root' and 'chmod go-w')"
                )
            return f.read().decode("utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"{file}: config file not found") from None
        return None
    except PermissionError:
        raise ConfigError(f"{file}: permission denied reading the config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: cannot read the config file: {e}") from e


def trust_problem(st: os.stat_result) -> str | None:
    """Why root may not trust a file it reads instructions or secrets from, or None.

    It must be a regular file owned by root and writable by neither its group nor others.
    """
    import stat

    if stat.S_ISCHR(st.st_mode) and st.st_uid == 0 and st.st_rdev == os.makedev(1, 3):
        return None  # /dev/null: "no file", a common way to run on defaults
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != 0:
        return f"is owned by uid {st.st_uid}, not root"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def read_secret(path: str | os.PathLike, key: str) -> str:
    """The first line of a secret file, which others may neither read nor write.

    Raises:
        SecretUnavailable: this user may not read it (the file is for root and admins).
        ConfigError: missing or empty; readable or writable by others; as root, not owned
            by root or writable by its group.
    """
    import stat

    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
                raise ConfigError(
                    f"{key} {path}: readable or writable by others (mode "
                    f"{stat.S_IMODE(st.st_mode):o}); a secret must not be: "
                    "fix with 'chmod o-rw'"
                )
            problem = trust_problem(st) if os.geteuid() == 0 else None
            if problem is not None:
                raise ConfigError(
                    f"{key} {path}: {problem}; root refuses a secret another "
                    "user could have written"
                )
            lines = f.read(4096).decode("utf-8", "replace").splitlines()
    except PermissionError:
        raise SecretUnavailable(f"{key} {path} is readable by root and admins only") from None
    except FileNotFoundError:
        raise ConfigError(f"{key} {path}: not found") from None
    except OSError as e:
        raise ConfigError(f"{key} {path}: cannot read it: {e.strerror or e}") from e
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ConfigError(f"{key} {path}: empty")
    return secret


def _parse_file(text: str, where: str) -> dict[str, Any]:
    """The file's mapping, checked on its own so that errors name the file, not overrides."""
    parsed = _parse_yaml(text, where)
    if parsed is None:
        parsed = {}
    if not isinstance(parsed, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys to values")
    from_mapping(parsed, where)
    return parsed


def as_dict(config: Config) -> dict[str, Any]:
    """The configuration as plain data (for `llem doctor` and JSON output)."""
    from dataclasses import asdict

    out = asdict(config)
    if isinstance(out.get("sensors"), tuple):
        out["sensors"] = list(out["sensors"])
    return out
