"""``llem doctor``: what this node can measure, and exactly why not."""

from __future__ import annotations

import json
import os
import platform
import pwd
import stat
import sys
import time
from pathlib import Path

import click

from llem import __version__
from llem import config as config_mod
from llem.errors import ConfigError
from llem.safetext import safe_text


def _path_info(path: str) -> dict:
    p = Path(path)
    info: dict = {"path": path, "exists": False}
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        parent = p.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        info["creatable"] = os.access(parent, os.W_OK | os.X_OK)
        return info
    except OSError as e:
        info["error"] = e.strerror
        return info
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    info.update(
        exists=True,
        type="symlink"
        if stat.S_ISLNK(st.st_mode)
        else "dir"
        if stat.S_ISDIR(st.st_mode)
        else "file",
        owner=owner,
        mode=f"{stat.S_IMODE(st.st_mode):04o}",
        writable=os.access(p, os.W_OK),
    )
    if st.st_mode & stat.S_IWOTH:
        info["warning"] = "writable by everyone"
    return info


def _ledger(config, problems: list[str]) -> dict | None:
    """The ledger as the admin node sees it: backend, version, schema, partitions, last
    merge. None where there is no ledger to see (a compute node with an SQLite path)."""
    from llem.cluster.pg_ledger import is_postgres, redact
    from llem.errors import LedgerError

    info: dict = {"ledger": redact(config.ledger)}
    if not is_postgres(config.ledger):
        if not Path(config.ledger).is_file():
            return None
        import sqlite3

        from llem.cluster.ledger import Ledger
        from llem.cluster.pass_status import read_pass_status

        info.update(backend="sqlite", version=sqlite3.sqlite_version)
        try:
            with Ledger(config.ledger, readonly=True) as led:
                info["schema"] = led.query("PRAGMA user_version")[0][0]
                info["job_runs"] = led.query("SELECT COUNT(*) FROM job_runs")[0][0]
        except LedgerError as e:
            info["error"] = str(e)
            problems.append(f"ledger: {e}")
        status = read_pass_status(config)
        info["last_merge"] = (
            {"ts_s": status.last_end_s, "slices": status.last_merged} if status else None
        )
        return info
    from llem.cluster.pg_ledger import INSTALL_HINT, PgLedger

    info["backend"] = "postgresql"
    try:
        with PgLedger(config.ledger, readonly=True) as led:
            info["version"] = led.server_version()
            info["schema"] = led.schema_version()
            info["job_runs"] = led.query("SELECT COUNT(*) FROM job_runs")[0][0]
            parts = led.partitions()
            info["partitions"] = [{"table": t, "name": n, "rows": r} for t, n, r in parts]
            last = led.last_merge()
            info["last_merge"] = (
                {"ts_s": last["ts_ns"] / 1e9, "slices": last["slices"], "host": last["host"]}
                if last
                else None
            )
    except LedgerError as e:
        info["error"] = str(e)
        if INSTALL_HINT not in str(e):  # the driver is needed on the admin host only
            problems.append(f"ledger: {e}")
    return info


def _render_ledger(info: dict) -> list[str]:
    out = ["", f"Ledger: {info['ledger']}"]
    if "version" in info:
        out.append(f"  backend {info['backend']} {info['version']}, schema {info.get('schema')}")
    if "error" in info:
        out.append(f"  ERROR {info['error']}")
        return out
    out.append(f"  {info['job_runs']:,} job runs")
    parts = info.get("partitions")
    if parts is not None:
        for table in ("job_energy", "node_hours"):
            mine = [p for p in parts if p["table"] == table]
            span = f", {mine[0]['name'][-6:]} to {mine[-1]['name'][-6:]}" if mine else ""
            rows = sum(max(p["rows"], 0) for p in mine)
            out.append(f"  {table}: {len(mine)} month partition(s){span}, ~{rows:,} rows")
    last = info.get("last_merge")
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(last["ts_s"]))
        host = f" on {last['host']}" if last.get("host") else ""
        out.append(f"  last merge {when}{host}: {last['slices']} slice(s)")
    else:
        out.append("  no merge yet")
    return out


def _hook_defaults(env: dict) -> dict[str, str]:
    """The LLEM_* settings the Slurm hooks read (plain KEY=VALUE lines)."""
    path = Path(env.get("LLEM_DEFAULTS_FILE") or "/etc/default/llem")
    out = {"_file": str(path)}
    try:
        for line in path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.startswith("LLEM_"):
                out[key] = value.strip().strip("\"'")
    except OSError:
        out["_missing"] = "yes"
    return out


def _spool(config, problems: list[str]) -> dict:
    from llem.cluster.aggregate import quarantine_report
    from llem.node.outbox import pending_slices

    info: dict = {"outbox_pending": 0, "quarantined": []}
    try:
        info["outbox_pending"] = len(pending_slices(config))
    except OSError as e:
        info["outbox_error"] = str(e)
    try:
        info["quarantined"] = quarantine_report(config)
    except OSError as e:
        info["quarantine_error"] = str(e)
    if info["quarantined"]:
        problems.append(f"{len(info['quarantined'])} slice(s) in quarantine (see 'Spool')")
    if info["outbox_pending"]:
        problems.append(
            f"{info['outbox_pending']} slice(s) wait in the outbox: is the spool "
            f"{config.spool_dir} reachable?"
        )
    return info


def _probe_window_server(path, pid: int | None) -> dict:
    """Ask the node sampler's socket a harmless question (``ping``: no reading is taken)."""
    from llem.node.windows import WindowError, ping

    if not pid:
        if path.exists():
            return {"state": "stale", "problem": None}  # a dead sampler's socket: harmless
        return {"state": "no sampler", "problem": None}
    if not path.exists():
        return {
            "state": "missing",
            "problem": f"the sampler (pid {pid}) has no socket at "
            f"{path}: 'srun llem wrap' falls back to whole-node measurement",
        }
    try:
        ping(path)
    except WindowError as e:
        return {
            "state": "not answering",
            "problem": f"the sampler (pid {pid}) does not answer "
            f"on {path} ({e}): 'srun llem wrap' falls back to whole-node measurement",
        }
    return {"state": "answering", "problem": None}


STUCK_AFTER_MIN_S = 60.0
"""A live sampler with no reading for this long (or ten of its intervals, if longer) is stuck."""


def _stuck_sampler(config, paths, pid: int) -> dict:
    """How long ago the live sampler's last reading ended, and a problem when it is stuck:
    alive and holding the node's lock, so that no other sampler starts, but reading nothing
    (its jobs are neither measured nor sealed). Its window socket may still answer."""
    from llem.errors import StoreError
    from llem.node.store import NodeStore

    try:
        with NodeStore(paths.store, readonly=True) as store:
            last_ns = store.last_interval_end_ns()
    except (StoreError, OSError):
        return {"last_reading_s": None, "problem": None}  # not made yet, or unreadable
    if last_ns is None:
        return {"last_reading_s": None, "problem": None}  # no reading yet: just started
    ago_s = (time.time_ns() - last_ns) / 1e9
    limit_s = max(STUCK_AFTER_MIN_S, 10 * config.sampler.interval_s)
    problem = None
    if ago_s > limit_s:
        # pid -1: the lock is held but the pid file unreadable; never advise "kill -1"
        who = f"pid {pid}" if pid > 0 else f"the holder of {paths.sampler_lock}: fuser -v it"
        stop = f"kill {pid}" if pid > 0 else "kill the holder"
        problem = (
            f"the node sampler ({who}) holds the node's lock but its last reading ended "
            f"{ago_s:.0f} s ago (interval {config.sampler.interval_s:g} s): it is stuck, and "
            f"no job on this node is measured or sealed. Stop it ({stop}; kill -9 if it "
            "stays): the next Prolog starts a new sampler, which records the gap"
        )
    return {"last_reading_s": round(ago_s, 1), "problem": problem}


def _node_sampler(config, node: str, env: dict, problems: list[str]) -> dict:
    from llem.node.daemon import sampler_pid
    from llem.node.jobs import pending
    from llem.paths import NodePaths

    paths = NodePaths.of(config, node)
    info: dict = {"run_dir": str(paths.run), "store": str(paths.store)}
    pid = sampler_pid(paths) if paths.run.is_dir() else None
    info["pid"] = pid
    info["pending_registrations"] = len(pending(paths.jobs))
    try:
        lines = paths.problems.read_text().splitlines()
        info["recent_problems"] = lines[-10:]
    except OSError:
        info["recent_problems"] = []
    if info["recent_problems"]:
        problems.append(f"recent problems of the Slurm hooks on {node}: see 'Node sampler'")
    info["window_server"] = _probe_window_server(paths.socket, pid)
    if info["window_server"]["problem"]:
        problems.append(f"window server of {node}: {info['window_server']['problem']}")
    info["last_reading_s"] = None
    if pid:
        stuck = _stuck_sampler(config, paths, pid)
        info["last_reading_s"] = stuck["last_reading_s"]
        if stuck["problem"]:
            problems.append(stuck["problem"])
    hook = _hook_defaults(env)
    info["hook_settings"] = hook
    hook_run_dir = hook.get("LLEM_RUN_DIR", "/run/llem")
    if hook_run_dir.rstrip("/") != config.run_dir.rstrip("/"):
        problems.append(
            f"the Slurm hooks look for the node sampler under {hook_run_dir} but the config's "
            f"run_dir is {config.run_dir}: set LLEM_RUN_DIR={config.run_dir} in "
            f"{hook['_file']} (otherwise every job start pays for Python)"
        )
    return info


def _sources(config, env: dict, report: dict) -> None:
    """Which sensor measures what, as the sampler opens them (one source per device), and
    whether a node meter gives the platform residual."""
    from llem.sensors import open_sensors
    from llem.sensors.platform import PlatformResidual

    try:
        opened = open_sensors(config, env=env)
    except Exception as e:  # a sensor named explicitly in the config that cannot be opened
        report["sources"] = [f"the sampler cannot open its sensors: {e}"]
        report["problems"].append(f"sensors: {e}")
        return
    try:
        report["sources"] = [n for n in opened.notes if "not read" in n]  # the choices
        devices = [d for s in opened.sensors for d in s.devices()]
        platform = PlatformResidual.for_devices(devices)
        report["coverage"]["platform"] = (
            f"measured ({', '.join(platform.meter_keys)} minus the parts)"
            if platform
            else "none (no node meter: pm_counters, ACPI power meter, Grace Hopper module, "
            "or a BMC with ipmi.enabled)"
        )
    finally:
        opened.close()


def _node_cpus(node: str, env) -> dict:
    """The node's CPUs as the sampler takes them for allocation shares, and where from."""
    from llem.node.attribution import node_cpus
    from llem.node.slurm import slurm_conf_path, slurm_node_cpus

    path = slurm_conf_path(env)
    cpus = slurm_node_cpus(path, node)
    if cpus:
        return {"cpus": cpus, "source": f"slurm.conf ({path})"}
    return {"cpus": node_cpus(), "source": "/proc/stat (slurm.conf does not say)"}


def _attribution(config, devices, store_path, node: str = "", env=None) -> dict:
    """The attribution policy, the node's CPUs and the idle power in force for each CPU and
    DRAM device."""
    from llem.node.idle import IdleLearner, package_tdp_w

    tdp_w = package_tdp_w(config.estimate)
    store = None
    try:
        if store_path.is_file():
            from llem.node.store import NodeStore

            store = NodeStore(store_path, readonly=True)
    except Exception:  # noqa: BLE001 - an unreadable store only hides learned figures
        store = None
    try:
        learner = IdleLearner(
            devices, store, config.attribution.idle_w, config.estimate.cpu_idle_fraction, tdp_w
        )
    except Exception:  # noqa: BLE001 - a store from an older llem has no idle_power yet
        learner = IdleLearner(
            devices, None, config.attribution.idle_w, config.estimate.cpu_idle_fraction, tdp_w
        )
    finally:
        if store is not None:
            store.close()
    idle = learner.resolve()
    return {
        "policy": config.attribution.policy,
        "node_cpus": _node_cpus(node, env or {}),
        "idle_w": {
            d.key: (
                {
                    "w": idle[d.key].power_mw / 1000,
                    "source": idle[d.key].source,
                    "samples": idle[d.key].samples,
                }
                if d.key in idle
                else None
            )
            for d in devices
            if d.component in ("cpu", "dram")
        },
    }


def _gateway(config, problems: list[str]) -> dict | None:
    """When ``ledger`` names the gateway: reachable, munge working (TCP), who it says you are."""
    from llem.gateway import client, wire

    try:
        target = client.target_of(config.ledger)
    except client.GatewayError as e:
        problems.append(f"gateway: {e}")
        return {"target": config.ledger, "state": "bad address", "error": str(e)}
    if target is None:
        return None
    info: dict = {"target": str(target), "transport": "unix" if target.path else "tcp+munge"}
    if target.path is None:
        from llem import munge

        try:
            cred = munge.encode(b"llem doctor", config.gateway.munge_socket)
            info["munge"] = "works (a credential was made)"
            try:
                munge.decode(cred, config.gateway.munge_socket)
            except munge.MungeError as e:
                info["munge"] = f"made a credential but cannot decode it locally: {e}"
        except munge.MungeError as e:
            info["munge"] = f"not working: {e}"
            problems.append(
                f"gateway: munge is not working ({e}); llem-acct cannot reach the gateway"
            )
    try:
        answer = client.ask(
            target,
            wire.Request(op="whoami", cluster=config.cluster),
            munge_socket=config.gateway.munge_socket,
            timeout_s=10.0,
        )
    except client.GatewayError as e:
        info.update(state="not working", error=str(e))
        problems.append(f"gateway: {e}")
        return info
    identity = answer.get("identity") or {}
    info.update(state="answers", identity=identity)
    return info


def diagnose(env: dict | None = None) -> dict:
    """Everything ``llem doctor`` reports, as data."""
    from llem.sensors import probe_all

    env = dict(os.environ) if env is None else env
    report: dict = {
        "llem": __version__,
        "python": sys.version.split()[0],
        "host": platform.node(),
        "node": env.get("SLURMD_NODENAME") or platform.node().split(".")[0],
        "uid": os.geteuid(),
        "config_file": str(config_mod.config_path(env)),
        "config_error": None,
        "problems": [],
    }
    try:
        config = config_mod.load(env=env)
    except ConfigError as e:
        report["config_error"] = str(e)
        report["problems"].append(f"config: {e}")
        config = config_mod.Config(source="defaults (the config is invalid)")
    report["config_source"] = config.source
    report["config"] = config_mod.as_dict(config)
    if report["config"]["carbon"].get("provider_token"):
        report["config"]["carbon"]["provider_token"] = "***"
    probes = probe_all(config, env)
    report["sensors"] = [
        {
            "sensor": p.sensor,
            "available": p.available,
            "devices": [
                {"key": d.key, "component": d.component, "source": d.source, "method": d.method}
                for d in p.devices
            ],
            "problems": list(p.problems),
            "notes": list(p.notes),
        }
        for p in probes
    ]
    coverage = {}
    for component in ("cpu", "dram", "gpu"):
        measured = [
            p.sensor
            for p in probes
            if p.available
            and p.sensor != "estimate"
            and any(d.component == component for d in p.devices)
        ]
        if measured:
            coverage[component] = f"measured ({', '.join(measured)})"
        elif component in ("cpu", "dram"):
            coverage[component] = "estimated (model: docs/methodology.md)"
        else:
            coverage[component] = "none (no NVIDIA or AMD GPU found)"
    report["coverage"] = coverage
    _sources(config, env, report)
    from llem.cluster.pg_ledger import is_postgres

    report["paths"] = {
        "state_dir": _path_info(config.state_dir),
        "spool_dir": _path_info(config.spool_dir),
    }
    if not is_postgres(config.ledger):
        report["paths"]["ledger"] = _path_info(config.ledger)
    report["ledger"] = _ledger(config, report["problems"])
    for name, info in report["paths"].items():
        if info.get("warning"):
            report["problems"].append(f"{name} {info['path']}: {info['warning']}")
    report["gateway"] = _gateway(config, report["problems"])
    report["node_sampler"] = _node_sampler(config, report["node"], env, report["problems"])
    report["spool"] = _spool(config, report["problems"])
    from llem.paths import NodePaths

    report["attribution"] = _attribution(
        config,
        [d for p in probes if p.available for d in p.devices],
        NodePaths.of(config, report["node"]).store,
        report["node"],
        env,
    )
    report["environment"] = {k: v for k, v in sorted(env.items()) if k.startswith("LLEM_")}
    if os.geteuid() != 0:
        report["notes"] = ["not running as root: what root-only counters show may differ"]
    return report


def render(report: dict) -> str:
    out = [
        f"llem {report['llem']} on {report['node']} (host {report['host']}, uid {report['uid']},"
        f" Python {report['python']})",
        "",
    ]
    out.append(f"Config: {report['config_source']}")
    if report["config_error"]:
        out.append(f"  ERROR {report['config_error']}")
    out.append("")
    out.append("What this node measures:")
    for component, how in report["coverage"].items():
        out.append(f"  {component:<5} {how}")
    for note in report.get("sources", []):
        out.append(f"  source: {note}")
    out.append("")
    out.append("Sensors:")
    for s in report["sensors"]:
        state = "available" if s["available"] else "not available"
        out.append(f"  {s['sensor']}: {state}")
        for d in s["devices"]:
            out.append(f"    {d['key']} ({d['component']}, {d['source']}, {d['method']})")
        for p in s["problems"]:
            out.append(f"    why not: {p}")
        for n in s["notes"]:
            out.append(f"    note: {n}")
    out.append("")
    out.append("Paths:")
    for name, info in report["paths"].items():
        if info["exists"]:
            desc = (
                f"{info['type']}, owner {info['owner']}, mode {info['mode']}, "
                f"{'writable' if info['writable'] else 'not writable'} by this user"
            )
        elif "error" in info:
            desc = f"cannot inspect: {info['error']}"
        else:
            desc = (
                "missing ("
                + ("can be created" if info.get("creatable") else "cannot be created by this user")
                + ")"
            )
        out.append(f"  {name:<9} {info['path']}: {desc}")
    gw = report.get("gateway")
    if gw is not None:
        out.append("")
        out.append(f"Ledger gateway: {gw['target']} ({gw.get('transport', '?')})")
        if "munge" in gw:
            out.append(f"  munge: {gw['munge']}")
        if gw.get("state") == "answers":
            who = gw["identity"]
            out.append(
                f"  answers: you are {who.get('user')} (uid {who.get('uid')}), "
                f"{who.get('role')}: you see {who.get('sees')} (privacy: {who.get('privacy')})"
            )
        else:
            out.append(f"  {gw.get('state')}: {gw.get('error')}")
    att = report["attribution"]
    out.append("")
    out.append(
        f"Attribution: policy {att['policy']} (a job holding every CPU of the node: "
        "exclusive, the whole node)"
    )
    cpus = att["node_cpus"]
    out.append(f"  node CPUs for allocation shares: {cpus['cpus'] or 'unknown'} ({cpus['source']})")
    for key, idle in att["idle_w"].items():
        how = (
            "none: shared by use alone"
            if idle is None
            else f"{idle['w']:.1f} W ({idle['source']}"
            + (f", {idle['samples']} idle samples)" if idle["source"] == "learned" else ")")
        )
        out.append(f"  idle power {key}: {how}")
    ns = report["node_sampler"]
    out.append("")
    out.append("Node sampler:")
    state = f"running, pid {ns['pid']}" if ns["pid"] else "not running"
    out.append(f"  {state}; run dir {ns['run_dir']}; store {ns['store']}")
    if ns["pid"]:
        out.append(f"  window socket: {ns['window_server']['state']}")
        if ns.get("last_reading_s") is not None:
            out.append(f"  last reading ended {ns['last_reading_s']:g} s ago")
    if ns["pending_registrations"]:
        out.append(f"  {ns['pending_registrations']} job registration(s) waiting")
    for line in ns["recent_problems"]:
        out.append(f"  problem: {line}")
    if report.get("ledger"):
        out += _render_ledger(report["ledger"])
    sp = report["spool"]
    if sp["outbox_pending"] or sp["quarantined"]:
        out.append("")
        out.append("Spool:")
        if sp["outbox_pending"]:
            out.append(f"  {sp['outbox_pending']} slice(s) waiting in the node's outbox")
        for q in sp["quarantined"]:
            out.append(f"  quarantined: {q.get('path')}: {q.get('reason')}")
    if report["environment"]:
        out.append("")
        out.append("Environment:")
        for k, v in report["environment"].items():
            out.append(f"  {k}={v}")
    for note in report.get("notes", []):
        out += ["", f"Note: {note}"]
    if report["problems"]:
        out.append("")
        out.append("Problems:")
        out.extend(f"  - {p}" for p in report["problems"])
    # Names, paths and problem texts may come from users (jobs, slices): one rule for all.
    return "\n".join(safe_text(line) for line in out)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Show what this node can measure and exactly why not.

    Exits 1 when the configuration is invalid, 0 otherwise (a node with nothing to read is
    not an error: llem then estimates, and says so).
    """
    report = diagnose()
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    ctx.exit(1 if report["config_error"] else 0)
