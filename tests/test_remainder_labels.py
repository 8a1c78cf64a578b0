"""The remainder's labels (issue 13): under ``hybrid``, the static part of a shared package
that no job's allocation covers is ``idle_unallocated``, from the node store through the
slices to the ledger and the report; the invariant stays exact in the store; slices and
ledgers from before the labels still merge and read, with the parts unknown (not zero)."""

import json
import sqlite3

from llem import slices
from llem.cluster import report_queries as q
from llem.cluster.ledger import Ledger
from llem.model import EnergyRow, Interval, Remainder
from llem.node.export import export_job, export_node
from llem.node.store import NodeStore
from llem.report import build_report, frames, render
from tests.helpers.ledger import merge
from tests.helpers.nodes import DEVICES, T0, S, build_store, node_config
from tests.helpers.report_data import report_config

NODE_CPUS = 32
JOB_CPUS = 8  # SLURM_JOB_CPUS_PER_NODE of the builder's Prolog environment
IDLE_W = 40.0
STEP_S = 60
SECONDS = 3600
PKG = "rapl:package-0"
# Per 60 s interval: static 40 W x 60 s = 2,400 J; the job's 8 of 32 CPUs take 600 J of it.
STATIC_UJ = int(IDLE_W * STEP_S * 1e6)
IDLE_UNALLOCATED_UJ = STATIC_UJ * (NODE_CPUS - JOB_CPUS) // NODE_CPUS
INTERVALS = SECONDS // STEP_S


def hybrid_store(tmp_path):
    return build_store(
        tmp_path / "s" / "node.db",
        seconds=SECONDS,
        step_s=STEP_S,
        node_cpus=NODE_CPUS,
        idle_w={"cpu": IDLE_W},
    )


def test_the_unallocated_static_share_is_labelled_in_the_node_store(tmp_path):
    store, run_id = hybrid_store(tmp_path)
    ((idle_unallocated, unallocated),) = store.query(
        "SELECT SUM(idle_unallocated_uj), SUM(unallocated_uj) FROM remainder WHERE device_key = ?",
        (PKG,),
    )
    assert (idle_unallocated, unallocated) == (IDLE_UNALLOCATED_UJ * INTERVALS, 0)
    # The labelled parts are parts: never more than the row's remainder.
    assert store.query(
        "SELECT COUNT(*) FROM remainder WHERE idle_unallocated_uj + unallocated_uj > energy_uj"
    ) == [(0,)]
    idle_charged = store.query(
        "SELECT SUM(energy_uj) FROM job_energy WHERE run_id = ? AND device_key = ? "
        "AND method = 'idle_allocation'",
        (run_id, PKG),
    )[0][0]
    assert idle_charged + idle_unallocated == STATIC_UJ * INTERVALS
    # The invariant, per interval and device.
    broken = store.query(
        "SELECT e.interval_id, e.device_key FROM energy e WHERE e.energy_uj != "
        "COALESCE((SELECT SUM(j.energy_uj) FROM job_energy j WHERE j.interval_id = "
        "e.interval_id AND j.device_key = e.device_key), 0) + COALESCE((SELECT "
        "SUM(r.energy_uj) FROM remainder r WHERE r.interval_id = e.interval_id AND "
        "r.device_key = e.device_key), 0)"
    )
    assert broken == []
    store.close()


def test_the_label_travels_through_the_slices_to_the_ledger_and_the_report(tmp_path):
    store, run_id = hybrid_store(tmp_path)
    cfg = node_config(tmp_path)
    end_ns = T0 + 1800 * S + SECONDS * S
    job = export_job(store, run_id, cfg, now_ns=end_ns + S)
    node = export_node(store, cfg, "n1", since_ns=T0, until_ns=end_ns, now_ns=end_ns + S)
    store.close()
    totals = job["node_totals"][PKG]
    assert totals["idle_unallocated_uj"] == IDLE_UNALLOCATED_UJ * INTERVALS
    assert totals["unallocated_uj"] == 0
    assert totals["idle_unallocated_uj"] <= totals["remainder_uj"]
    hours = [r for r in node["hours"] if r["device"] == PKG]
    assert len(hours) == 2  # 21:30-22:30 crosses a clock hour
    assert sum(r["idle_unallocated_uj"] for r in hours) == IDLE_UNALLOCATED_UJ * INTERVALS
    path = tmp_path / "ledger" / "ledger.db"
    with Ledger(path) as ledger:
        merge(ledger, [job, node])
        (got,) = ledger.query(
            "SELECT SUM(idle_unallocated_uj), SUM(unallocated_uj) FROM node_hours "
            "WHERE device_key = ?",
            (PKG,),
        )
        assert got == (IDLE_UNALLOCATED_UJ * INTERVALS, 0)
        (got,) = ledger.query(
            "SELECT idle_unallocated_uj FROM job_node_totals WHERE device_key = ?", (PKG,)
        )
        assert got == (IDLE_UNALLOCATED_UJ * INTERVALS,)
    with q.open_readonly(path) as ledger:
        report = build_report(ledger, report_config(path), frames.month_period("2023-11"))
    kwh = IDLE_UNALLOCATED_UJ * INTERVALS / 3.6e12
    assert abs(report.reconciliation["idle_unallocated_kwh"] - kwh) < 1e-9
    md = render.to_markdown(report)
    assert "of which idle power no job's allocation covers (kWh)" in md


def test_slices_from_before_the_labels_merge_with_the_parts_unknown(tmp_path):
    store, run_id = hybrid_store(tmp_path)
    cfg = node_config(tmp_path)
    end_ns = T0 + 1800 * S + SECONDS * S
    job = export_job(store, run_id, cfg, now_ns=end_ns + S)
    node = export_node(store, cfg, "n1", since_ns=T0, until_ns=end_ns, now_ns=end_ns + S)
    store.close()
    for row in [*job["node_totals"].values(), *node["hours"]]:
        del row["idle_unallocated_uj"], row["unallocated_uj"]
    slices.validate(job)
    slices.validate(node)
    with Ledger(tmp_path / "ledger.db") as ledger:
        merge(ledger, [job, node])
        assert ledger.query("SELECT COUNT(*) FROM node_hours WHERE idle_unallocated_uj IS NULL")[0][
            0
        ] == len(node["hours"])


def test_a_labelled_part_larger_than_the_remainder_is_refused(tmp_path):
    store, run_id = hybrid_store(tmp_path)
    job = export_job(store, run_id, node_config(tmp_path))
    store.close()
    t = job["node_totals"][PKG]
    t["idle_unallocated_uj"] = t["remainder_uj"] + 10**6
    try:
        slices.validate(job)
    except slices.SliceError as e:
        assert "idle_unallocated_uj" in str(e) and "exceeds remainder_uj" in str(e)
    else:
        raise AssertionError("accepted")


def test_an_older_node_store_keeps_its_remainder_as_unattributed(tmp_path):
    path = tmp_path / "node.db"
    with NodeStore(path) as store:
        store.register_devices(DEVICES, T0)
        store.write(
            Interval("s", T0, T0 + S, 0, 1, (EnergyRow(PKG, 5, "ok", "ok", 5),), remainder=())
        )
    # Back to schema 3, as llem before the labels left it: a remainder row without parts.
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 3")
    db.executescript(
        "CREATE TABLE remainder_old (interval_id INTEGER NOT NULL, device_key TEXT NOT NULL, "
        "energy_uj INTEGER NOT NULL, PRIMARY KEY (interval_id, device_key)) WITHOUT ROWID;"
        "INSERT INTO remainder_old SELECT id, 'rapl:package-0', 5 FROM intervals;"
        "DROP TABLE remainder; ALTER TABLE remainder_old RENAME TO remainder;"
    )
    db.close()
    with NodeStore(path) as store:
        assert store.query(
            "SELECT energy_uj, idle_unallocated_uj, unallocated_uj FROM remainder"
        ) == [(5, 0, 0)]  # all of it unattributed
        store.write(
            Interval(
                "s",
                T0 + S,
                T0 + 2 * S,
                1,
                2,
                (EnergyRow(PKG, 7, "ok", "ok", 12),),
                remainder=(Remainder(PKG, 3, "idle_unallocated"), Remainder(PKG, 4)),
            )
        )
        totals = store.device_totals(T0, T0 + 3 * S)[PKG]
    assert totals["remainder_uj"] == 12 and totals["idle_unallocated_uj"] == 3
    assert json.dumps(totals)  # plain figures, ready for a slice
