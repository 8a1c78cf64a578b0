"""The shipped Grafana dashboards: every query names only metrics llem exports (the catalogue
in llem.exposition, which the writers enforce), parses as PromQL (promtool), and returns data
from a real Prometheus scraping what llem's own writers produced."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llem.cluster.aggregate import aggregate_once
from llem.cluster.metrics import collect
from llem.exposition import ALL, write_textfile
from tests.helpers.metrics import NOW, Rig
from tests.helpers.metrics import config as cluster_config
from tests.helpers.nodes import job_slices, spool_slice
from tests.promstack import PROMTOOL, Stack, need, wait_for

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "share" / "grafana"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))

KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "Inf",
    "NaN",
}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$")
# Grafana's variables, as a dashboard would have them filled in for a test scrape.
VARIABLES = {
    "$__rate_interval": "5s",
    "$__range": "1m",
    "$node": ".*",
    "$cluster": ".*",
    "$account": ".*",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels dropped)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = GROUPING.sub(" ", e)
    e = re.sub(r"(?<![\w:$.])(\d+(ms|[smhdwy]))+\b", " ", e)  # durations (offset 5m)
    e = re.sub(r"(?<![\w:$.])\d+(\.\d+)?([eE][+-]?\d+)?", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w$:])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if m.group() in KEYWORDS or e[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def queries(path: Path) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and template variable queries."""
    board = json.loads(path.read_text())
    out = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = LABEL_VALUES.match(q)
            assert m, f"{path.name}: variable {var['name']}: unexpected query {q}"
            out.append(m.group(1))
    return out


def filled(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def test_the_extractor_finds_names_and_only_names():
    expr = (
        'sum by (jobid, user) (rate(llem_job_energy_joules_total{node=~"$node",a="x y"}'
        "[$__rate_interval]) * on (node) group_left (user) llem_job_info) / 3.6e6 "
        "or vector(0) > bool 2 + node_cpu_seconds_total offset 5m"
    )
    assert metric_names(expr) == {
        "llem_job_energy_joules_total",
        "llem_job_info",
        "node_cpu_seconds_total",
    }


def test_dashboards_are_the_builders_output():
    assert [p.name for p in DASHBOARDS] == [
        "llem-accounts.json",
        "llem-health.json",
        "llem-nodes.json",
    ]
    r = subprocess.run(
        [sys.executable, str(GRAFANA / "build_dashboards.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_names_only_metrics_llem_exports(path):
    for expr in queries(path):
        names = metric_names(expr)
        assert names, f"{path.name}: no metric in {expr}"
        unknown = names - set(ALL)
        assert not unknown, f"{path.name}: {sorted(unknown)} are not exported by llem: {expr}"


def test_every_exported_metric_has_a_panel():
    used = set().union(*(metric_names(e) for p in DASHBOARDS for e in queries(p)))
    assert set(ALL) - used == set()


def test_every_query_parses(tmp_path):
    rules = {
        "groups": [
            {
                "name": p.stem,
                "rules": [
                    {"record": f"llem:dashboard_query:{i}", "expr": filled(e)}
                    for i, e in enumerate(queries(p))
                ],
            }
            for p in DASHBOARDS
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    r = subprocess.run(
        [need(PROMTOOL), "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_query_returns_data_from_a_real_prometheus(tmp_path):
    textfiles = tmp_path / "textfile"
    textfiles.mkdir(mode=0o755)
    rig = Rig(tmp_path, textfile_dir=textfiles)
    rig.job("101", gpus=("1",))
    for _ in range(2):
        rig.tick()
    cfg = cluster_config(tmp_path)
    for data in job_slices(tmp_path, "100"):
        spool_slice(cfg, data)
    aggregate_once(cfg, now_ns=NOW)
    spool_slice(cfg, job_slices(tmp_path, "300", nodes=("n1",))[0])  # a backlog of one
    write_textfile(textfiles, "llem_cluster.prom", collect(cfg))

    with Stack(textfiles, tmp_path / "prom") as stack:
        wait_for(
            "three scrapes",
            lambda: stack.query("count_over_time(llem_node_running_jobs[1m]) >= 3"),
            30,
        )
        empty = []
        for path in DASHBOARDS:
            for expr in queries(path):
                if not stack.query(filled(expr)):
                    empty.append(f"{path.name}: {expr}")
        assert not empty, "queries with no data:\n" + "\n".join(empty)


def test_every_metric_is_documented_with_its_type_and_labels():
    rows = {}
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        m = re.match(r"^\| `(llem_\w+)` \| (\w+) \|([^|]*)\|", line)
        if m:
            rows[m.group(1)] = (m.group(2), tuple(re.findall(r"`(\w+)`", m.group(3))))
    assert rows == {m.name: (m.type, m.labels) for m in ALL.values()}
