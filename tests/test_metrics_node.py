"""Node metrics in process: the writer against a real node store and the sampler loop with
fake sensors (our own seam); the real Prometheus stack is in test_metrics_prometheus.py."""

from __future__ import annotations

import json
import logging
import os

import pytest

from llem import config as config_mod
from llem.errors import ConfigError, LlemError
from llem.exposition import ALL, Exposition, escape, write_textfile
from llem.node.attribution import JobLoad
from llem.node.metrics import NodeMetrics, textfile_name
from tests.helpers.metrics import Rig, parse
from tests.promstack import promtool_check_metrics


def test_counters_equal_the_store_and_jobs_leave_at_the_epilog(tmp_path):
    rig = Rig(tmp_path, textfile_dir=tmp_path)
    a = rig.job("101", gpus=("1",))  # minor 1 = the GPU at NVML index 0
    rig.loads = [JobLoad(a, gpus=("fake:g0",), cpu_ns=5 * 10**8)]
    for _ in range(3):
        rig.tick()
    b = rig.job("102")
    rig.loads.append(JobLoad(b, cpu_ns=10**8))
    rig.tick()
    got = parse((tmp_path / textfile_name("n1")).read_text())
    for key, uj in rig.store.energy_by_device().items():
        dev = rig.devices[key]
        labels = (
            ("component", dev.component),
            ("device", key),
            ("node", "n1"),
            ("source", "measured"),
        )
        assert got[("llem_node_energy_joules_total", labels)] == uj / 1e6
    job_gpu = (("component", "gpu"), ("jobid", "101"), ("node", "n1"), ("source", "measured"))
    assert got[("llem_job_energy_joules_total", job_gpu)] == 80.0  # 4 ticks x 20 J
    job_cpu = (("component", "cpu"), ("jobid", "101"), ("node", "n1"), ("source", "measured"))
    assert got[("llem_job_energy_joules_total", job_cpu)] == 20.0  # 4 x half of 10 J
    b_cpu = (("component", "cpu"), ("jobid", "102"), ("node", "n1"), ("source", "measured"))
    assert got[("llem_job_energy_joules_total", b_cpu)] == 1.0  # 1 tick x a tenth of 10 J
    assert (
        got[
            (
                "llem_node_power_watts",
                (
                    ("component", "gpu"),
                    ("device", "fake:g1"),
                    ("node", "n1"),
                    ("source", "measured"),
                ),
            )
        ]
        == 20.0
    )
    assert got[("llem_node_running_jobs", (("node", "n1"),))] == 2
    assert got[("llem_sampler_intervals_total", (("node", "n1"),))] == 4

    rig.store.update_job(a, state="ended", end_ns=2)  # what the Epilog does
    rig.tick()
    text = (tmp_path / textfile_name("n1")).read_text()
    assert 'jobid="101"' not in text and 'jobid="102"' in text
    assert rig.metrics.job_uj.keys() == {b}


def test_a_restarted_sampler_starts_from_the_store_totals(tmp_path):
    rig = Rig(tmp_path, textfile_dir=tmp_path, gpus=False)
    a = rig.job("7")
    rig.loads = [JobLoad(a, cpu_ns=10**9)]
    for _ in range(3):
        rig.tick()
    # A new sampler process (same store): its counters continue, never restart at 0.
    rig.metrics = NodeMetrics(rig.store, "n1", list(rig.devices.values()), 1.0, tmp_path)
    rig.tick()
    got = parse((tmp_path / textfile_name("n1")).read_text())
    labels = (("component", "cpu"), ("jobid", "7"), ("node", "n1"), ("source", "measured"))
    assert got[("llem_job_energy_joules_total", labels)] == 40.0
    assert (
        got[
            (
                "llem_node_energy_joules_total",
                (
                    ("component", "cpu"),
                    ("device", "fake:pkg0"),
                    ("node", "n1"),
                    ("source", "measured"),
                ),
            )
        ]
        == 40.0
    )


def test_gaps_and_sensor_errors_are_counted(tmp_path):
    rig = Rig(tmp_path, textfile_dir=tmp_path, gpus=False)
    rig.tick()
    rig.cpu.status["pkg0"] = "error"
    rig.tick()
    rig.tick()
    rig.cpu.status.clear()
    rig.tick()
    got = parse((tmp_path / textfile_name("n1")).read_text())
    dev = (("device", "fake:pkg0"), ("node", "n1"))
    assert got[("llem_sampler_sensor_errors_total", dev)] == 2
    assert got[("llem_sampler_gaps_total", dev)] == 2


def test_the_file_passes_promtool_and_uses_only_catalogued_names(tmp_path):
    rig = Rig(tmp_path, textfile_dir=tmp_path)
    rig.job('we"ird\\job\nid', account="a,b")
    for _ in range(2):
        rig.tick()
    text = (tmp_path / textfile_name("n1")).read_text()
    assert 'jobid="we\\"ird\\\\job\\nid"' in text
    lint = promtool_check_metrics(text)
    assert lint.returncode == 0 and not lint.stdout and not lint.stderr, lint
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names == {m.name for m in ALL.values() if m.scope == "node"}
    assert " 17" not in text.split("llem_sampler_start_time_seconds", 1)[0]  # no timestamps
    for line in text.splitlines():
        if not line.startswith("#"):
            assert len(line.rsplit("}", 1)[-1].split()) == 1, line


def test_a_textfile_dir_another_user_controls_is_refused_and_sampling_goes_on(tmp_path, caplog):
    bad = tmp_path / "open"
    bad.mkdir()
    os.chmod(bad, 0o777)
    rig = Rig(tmp_path, textfile_dir=bad, gpus=False)
    with caplog.at_level(logging.WARNING, logger="llem.node.metrics"):
        rig.tick()
        rig.tick()
    assert list(bad.iterdir()) == []
    warnings = [r for r in caplog.records if "not written" in r.getMessage()]
    assert len(warnings) == 1 and "writable by group or others" in warnings[0].getMessage()
    assert rig.sampler.intervals == 2
    os.chmod(bad, 0o755)
    rig.tick()
    assert (bad / textfile_name("n1")).exists()


def test_off_by_default_writes_nothing(tmp_path):
    cfg = config_mod.Config()
    assert cfg.metrics.textfile_dir is None and cfg.metrics.dcgm_job_mapping_dir is None
    metrics = NodeMetrics.from_config(cfg, None, "n1", [], 1.0)
    assert not metrics.enabled
    metrics.on_interval(None)  # returns before touching anything


def test_config_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metrics:\n  textfile_dir: /var/lib/prometheus/node-exporter\n")
    cfg = config_mod.load(path, env={})
    assert cfg.metrics.textfile_dir == "/var/lib/prometheus/node-exporter"
    env = {"LLEM_METRICS_DCGM_JOB_MAPPING_DIR": "/run/dcgm-jobs"}
    assert config_mod.load(path, env=env).metrics.dcgm_job_mapping_dir == "/run/dcgm-jobs"
    path.write_text("metrics:\n  textfile: /x\n")
    with pytest.raises(ConfigError, match="did you mean 'metrics.textfile_dir'"):
        config_mod.load(path, env={})


def test_dcgm_job_mapping_files_by_nvml_index(tmp_path):
    mapping = tmp_path / "dcgm"
    mapping.mkdir(mode=0o755)
    rig = Rig(tmp_path, dcgm_dir=mapping)
    # Device keys, as the sampler stores a job's GPUs once it resolved Slurm's indices;
    # fake:g0 is NVML index 0 (minor 1) here, fake:g1 index 1 (minor 0).
    a = rig.job("55", gpus=("fake:g0",))
    b = rig.job("56", gpus=("fake:g1",))
    rig.tick()
    assert (mapping / "0").read_text() == "55\n"
    assert (mapping / "1").read_text() == "56\n"
    rig.store.update_job(a, state="ended")
    rig.tick()
    assert (mapping / "0").read_text() == ""
    assert sorted(p.name for p in mapping.iterdir()) == ["0", "1"]
    assert json.loads(rig.store.query("SELECT gpus FROM jobs WHERE run_id = ?", (b,))[0][0])


def test_exposition_refuses_what_the_catalogue_does_not_know():
    out = Exposition()
    with pytest.raises(ValueError, match="not in llem's catalogue"):
        out.add("llem_made_up_total", [])
    with pytest.raises(ValueError, match="label values"):
        out.add("llem_node_running_jobs", [(("a", "b"), 1)])
    assert escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_textfile_temporary_name_is_never_read_by_node_exporter(tmp_path, monkeypatch):
    seen = []
    real_rename = os.rename

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", spy)
    write_textfile(tmp_path, "llem_node_x.prom", "x 1\n")
    assert seen and not seen[0].endswith(".prom") and seen[0].startswith(".")
    assert (tmp_path / "llem_node_x.prom").read_text() == "x 1\n"


def test_the_textfile_is_readable_by_node_exporter_whatever_the_umask(tmp_path):
    old = os.umask(0o027)  # the node sampler's umask
    try:
        path = write_textfile(tmp_path, "llem_node_x.prom", "x 1\n")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_store_that_cannot_be_read_never_stops_the_sampler(tmp_path, caplog):
    rig = Rig(tmp_path, textfile_dir=tmp_path, gpus=False)
    interval = rig.tick()
    rig.store.db.execute("ALTER TABLE energy RENAME TO energy_gone")  # every query now fails
    rig.store.db.execute("ALTER TABLE jobs RENAME TO jobs_gone")
    with caplog.at_level(logging.WARNING, logger="llem.node.metrics"):
        metrics = NodeMetrics(rig.store, "n1", list(rig.devices.values()), 1.0, tmp_path)
        metrics.on_interval(interval)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "totals could not be read" in messages and "not written" in messages


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another user")
def test_a_textfile_dir_owned_by_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(LlemError, match="another user controls it"):
        write_textfile(theirs, "llem_node_x.prom", "x 1\n")
    assert list(theirs.iterdir()) == []
