"""Node stores and the slices exported from them, for the export, ledger, aggregate, reader,
acct and report tests.

A store is filled through the production code of a compute node: the job is registered as
the Slurm hook registers it (``write_registration`` of the Prolog's environment, then
``ingest``, i.e. ``job_from_env`` with ``gpu_indices``: the job's GPUs are Slurm's GRES
indices), each interval's energy is attributed by the sampler's ``JobAttributor`` (which
resolves those indices to the NVML device keys at the job's first interval and stores the
keys in the job's record; no gres.conf here: index = minor, flagged) from a node-usage tree
(``/proc/stat``, ``/proc/meminfo``, the job's cgroup v2 folder) that the builder advances,
and the job is ended and sealed through a registration and ``seal``. Only the sensors'
readings (the energy rows) and the named window are written by hand.

``build_store`` fills one store; ``job_slices`` exports one job slice per node of a
multi-node job; ``ENV`` is the EpilogSlurmctld environment of a job header.
"""

from pathlib import Path

from llem import slices
from llem.config import AggregateConfig, Config
from llem.fsutil import write_atomic
from llem.hostlist import expand_hostlist
from llem.model import EnergyRow, Interval
from llem.node.attribution import JobAttributor
from llem.node.export import export_job
from llem.node.idle import IdleLearner
from llem.node.jobs import ingest, seal, write_registration
from llem.node.store import NodeStore
from llem.node.usage import CLK_TCK
from llem.sensors.base import Device
from llem.sensors.platform import PlatformResidual
from llem.slices import encode

S = 10**9
# 2023-11-14 21:00:00 UTC: an hour boundary, so tests can cross the next one on purpose.
T0 = 1_699_995_600 * S
assert T0 % (3600 * S) == 0

GPU_UUID = "GPU-a"
GPU_MINOR = 0
"""The node's one GPU; without a gres.conf the sampler takes Slurm's index as its minor."""
GPU_KEY = f"nvml:{GPU_UUID}"
DEVICES = (
    Device("rapl:package-0", "cpu", "package-0", "rapl", "measured", "counter"),
    Device("rapl:dram-0", "dram", "dram-0", "rapl", "measured", "counter"),
    # as llem.sensors.nvml describes a GPU: key by UUID, name and attrs by minor number
    Device(
        GPU_KEY,
        "gpu",
        f"gpu{GPU_MINOR}",
        "nvml",
        "measured",
        "counter",
        attrs={"uuid": GPU_UUID, "minor": GPU_MINOR, "index": 0},
    ),
)

METER = Device(
    "hwmon:node",
    "psys",
    "node",
    "hwmon",
    "measured",
    "power_poll",
    attrs={"meter": "node", "averaging_window_ms": 1000},
)
"""A node with an ACPI power meter (as llem.sensors.hwmon describes one): with ``platform_uw``
the builders add it and the platform residual the sampler derives from it."""


def devices_of(platform_uw: int) -> tuple[Device, ...]:
    """The node's devices: with a node meter and its platform device when it has one."""
    if not platform_uw:
        return DEVICES
    residual = PlatformResidual.for_devices([*DEVICES, METER])
    assert residual is not None
    return (*DEVICES, METER, residual.device)


JOB_CPU_SHARE = (6, 10)
"""The job's CPU time over the node's busy CPU time, every interval."""
MEMORY_TOTAL = 4 << 30
NODE_MEMORY_USED = 2 << 30
JOB_MEMORY = 1 << 30


def node_config(tmp_path, node="n1", **aggregate) -> Config:
    """A config whose node-local state, spool and ledger live under tmp_path."""
    return Config(
        cluster="c1",
        state_dir=str(tmp_path / "state" / node),
        spool_dir=str(tmp_path / "spool"),
        ledger=str(tmp_path / "ledger" / "ledger.db"),
        aggregate=AggregateConfig(**aggregate),
    )


def prolog_env(
    job_id="100",
    node="n1",
    nodelist="n[1-3]",
    user="alice",
    name="train; rm -rf /",
    gpus=str(GPU_MINOR),
    account="physics",
    partition="gpu",
    tag="exp-1",
) -> dict[str, str]:
    """The slurmd Prolog's environment of a job (Slurm 22.05), as the hook records it."""
    env = {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_UID": "1000",
        "SLURM_JOB_GID": "1000",
        "SLURM_JOB_USER": user,
        "SLURM_JOB_ACCOUNT": account,
        "SLURM_JOB_PARTITION": partition,
        "SLURM_CLUSTER_NAME": "c1",
        "SLURMD_NODENAME": node,
        "SLURM_NODELIST": nodelist,
        "SLURM_JOB_NUM_NODES": str(len(expand_hostlist(nodelist))),
        "SLURM_JOB_CPUS_PER_NODE": "8",
        "SLURM_JOB_NAME": name,
    }
    if gpus:
        env["SLURM_JOB_GPUS"] = gpus
    if tag:
        env["SPANK_LLEM_ENERGY_TAG"] = tag
    return env


def register(store: NodeStore, kind: str, env: dict[str, str], at_ns: int) -> None:
    """What the Prolog (``start``) or Epilog (``end``) hook and the sampler do with a job."""
    jobs_dir = store.path.parent / "jobs"
    jobs_dir.mkdir(mode=0o700, exist_ok=True)
    write_registration(jobs_dir, kind, env, at_ns=at_ns)
    assert ingest(store, jobs_dir, "c1", env["SLURMD_NODENAME"]) == [(env["SLURM_JOB_ID"], kind)]


def build_store(
    path,
    node="n1",
    job_id="100",
    start_ns=T0 + 1800 * S,
    seconds=3600,
    step_s=60,
    nodelist="n[1-3]",
    user="alice",
    name="train; rm -rf /",
    cpu_uw=100_000_000,
    gpu_uw=250_000_000,
    windows=True,
    end=True,
    gpus=str(GPU_MINOR),
    platform_uw=0,
    node_cpus=None,
    idle_w=None,
    work=None,
    unit=None,
    steps=None,
) -> tuple[NodeStore, int]:
    """A node store with one job run on ``node``, sampled every ``step_s`` seconds.

    ``node_cpus``: the CPUs /proc/stat lists (None: none listed, the node's size unknown, so
    the job is charged by use); ``idle_w``: ``attribution.idle_w`` (the job holds 8 CPUs).

    Per interval: the CPU package draws ``cpu_uw`` microwatts and the job 60 % of the node's
    busy CPU time; DRAM 10 W, the job holding half the memory in use; the GPU ``gpu_uw``,
    all to the job when it holds the GPU (``gpus``: ``SLURM_JOB_GPUS``). The default run
    starts at 21:30 and lasts an hour, so its energy falls in two clock hours. With
    ``platform_uw`` the node has a power meter reading the parts plus that much, and the
    sampler's platform residual is charged by the attributor. ``work`` and ``unit``: what
    the window says it did when it closes (as ``llem.window(work=...)`` reports it).
    ``steps``: the job's step cgroups and their weights in its CPU time (``_advance_usage``).
    """
    store = NodeStore(path)
    store.register_devices(devices_of(platform_uw), start_ns)
    env = prolog_env(job_id, node, nodelist, user, name, gpus)
    register(store, "start", env, start_ns)
    (run_id,) = [r.run_id for r in store.runs_of(job_id, "running") if r.start_ns == start_ns]
    add_intervals(
        store,
        run_id,
        start_ns,
        seconds,
        step_s,
        cpu_uw,
        gpu_uw,
        platform_uw=platform_uw,
        node_cpus=node_cpus,
        idle_w=idle_w,
        steps=steps,
    )
    if windows:  # through the store's own window calls, as the window server makes them
        window_id = store.open_window(
            run_id, job_id, "0", "epoch 1", 1000, 4242, start_ns + 60 * S, 0, {}
        )
        store.close_window(window_id, start_ns + 600 * S, 1, {}, {GPU_KEY: 135_000_000}, work, unit)
    if end:
        register(store, "end", env, start_ns + seconds * S)
        seal(store, store.run(run_id))
    return store, run_id


def _advance_usage(
    root: Path,
    job_id: str,
    seconds: int,
    node_cpus: int | None = None,
    steps: dict[str, int] | None = None,
) -> None:
    """The node was busy for ``seconds`` of CPU time, the job for 60 % of it; with ``steps``
    (step name -> weight), the job's step cgroups (``step_<name>``, as slurmstepd makes them)
    share the job's CPU time by weight (a weight of 0: the step exists, idle)."""
    proc = root / "proc"
    cgroup = root / "cgroup" / "system.slice" / "slurmstepd.scope" / f"job_{job_id}"
    proc.mkdir(parents=True, exist_ok=True)
    cgroup.mkdir(parents=True, exist_ok=True)
    stat = proc / "stat"
    ticks = int(stat.read_text().split()[1]) if stat.exists() else 0
    per_cpu = "".join(f"cpu{i} 0 0 0 0 0 0 0 0 0 0\n" for i in range(node_cpus or 0))
    stat.write_text(f"cpu  {ticks + seconds * CLK_TCK} 0 0 0 0 0 0 0 0 0\n{per_cpu}")
    (proc / "meminfo").write_text(
        f"MemTotal: {MEMORY_TOTAL >> 10} kB\n"
        f"MemAvailable: {(MEMORY_TOTAL - NODE_MEMORY_USED) >> 10} kB\n"
    )
    cpu = cgroup / "cpu.stat"
    usec = int(cpu.read_text().split()[1]) if cpu.exists() else 0
    delta = seconds * 1_000_000 * JOB_CPU_SHARE[0] // JOB_CPU_SHARE[1]
    cpu.write_text(f"usage_usec {usec + delta}\n")
    total = sum((steps or {}).values())
    for step, weight in (steps or {}).items():
        folder = cgroup / f"step_{step}"
        folder.mkdir(exist_ok=True)
        stat = folder / "cpu.stat"
        before = int(stat.read_text().split()[1]) if stat.exists() else 0
        stat.write_text(f"usage_usec {before + (delta * weight // total if total else 0)}\n")
    (cgroup / "memory.current").write_text(f"{JOB_MEMORY}\n")


def add_intervals(
    store,
    run_id,
    start_ns,
    seconds,
    step_s,
    cpu_uw=100_000_000,
    gpu_uw=250_000_000,
    first_id=0,
    platform_uw=0,
    node_cpus=None,
    idle_w=None,
    steps=None,
):
    """Sample ``seconds`` from ``start_ns`` while run ``run_id`` uses the node; the sampler's
    JobAttributor (policy ``hybrid``) splits each interval between the jobs the store holds
    as running. With ``platform_uw``, the meter reads the parts plus that, and the platform
    row is the sampler's residual (``PlatformResidual.row``)."""
    devices = devices_of(platform_uw)
    residual = PlatformResidual.for_devices(list(devices)) if platform_uw else None
    run = store.run(run_id)
    root = store.path.parent / "usage"
    _advance_usage(root, run.job_id, 0, node_cpus, steps)
    attributor = JobAttributor(
        store,
        run.node,
        devices,
        started_ns=start_ns,
        proc_root=root / "proc",
        cgroup_root=str(root / "cgroup"),
        idle=IdleLearner(devices, store, idle_w=idle_w),
    )
    attributor(Interval("s", start_ns, start_ns, first_id, first_id, ()))  # first reading
    for i in range(seconds // step_s):
        a = start_ns + i * step_s * S
        b = a + step_s * S
        _advance_usage(root, run.job_id, step_s, node_cpus, steps)
        cpu, dram, gpu = cpu_uw * step_s, 10_000_000 * step_s, gpu_uw * step_s
        rows = [
            EnergyRow("rapl:package-0", cpu, "ok", "ok", None),
            EnergyRow("rapl:dram-0", dram, "ok", "ok", None),
            EnergyRow(GPU_KEY, gpu, "ok", "ok", None),
        ]
        events: list = []
        if residual is not None:
            meter = cpu + dram + gpu + platform_uw * step_s
            rows.append(EnergyRow(METER.key, meter, "ok", "ok", None))
            rows.append(residual.row(rows, b, events))
        interval = Interval("s", a, b, first_id + i, first_id + i + 1, tuple(rows), tuple(events))
        store.write(attributor(interval))


def spool_slice(config: Config, data: dict) -> Path:
    """Drop a slice straight into the spool as the Epilog's delivery would."""
    spool = slices.check_spool_dir(Path(config.spool_dir))
    return write_atomic(spool, slices.file_name(data), encode(data), 0o640)


def job_slices(tmp_path, job_id="100", nodes=("n1", "n2", "n3"), **kwargs) -> list[dict]:
    """One job slice per node of a multi-node job, each from its own real node store."""
    out = []
    for i, node in enumerate(nodes):
        store, run_id = build_store(
            tmp_path / f"store-{job_id}-{node}" / "node.db", node=node, job_id=job_id, **kwargs
        )
        out.append(
            export_job(store, run_id, node_config(tmp_path, node), now_ns=T0 + 10 * 3600 * S + i)
        )
        store.close()
    return out


# The EpilogSlurmctld environment of a job (its header slice).
ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "my job",
    "SLURM_JOB_NODELIST": "n[1-3]",
    "SLURM_JOB_ACCOUNT": "physics",
    "SLURM_JOB_USER": "alice",
    "SLURM_JOB_UID": "1000",
    "SLURM_JOB_PARTITION": "gpu",
    "SLURM_JOB_EXIT_CODE": "0",
    "SLURM_JOB_DERIVED_EC": "0",
    "SLURM_CLUSTER_NAME": "c1",
}
