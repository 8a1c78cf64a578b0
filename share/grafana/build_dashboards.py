#!/usr/bin/env python3
"""Build llem's Grafana dashboards (the JSON files beside this script).

Standard library only. Every query names only metrics of ``llem.exposition`` (tests/
test_metrics_dashboards.py checks it, and checks that the files are this script's output):

    python3 share/grafana/build_dashboards.py           # rewrite the JSON files
    python3 share/grafana/build_dashboards.py --check   # exit 1 when a file is out of date

Import them in Grafana (Dashboards > New > Import), choosing the Prometheus data source that
scrapes the node_exporters; docs/metrics.md says how to wire it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}


def _var_datasource() -> dict:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
    }


def _var_query(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {},
        "sort": 1,
        "hide": 0,
    }


def _panel(
    title: str,
    targets: list[tuple[str, str]],
    *,
    unit: str,
    kind: str = "timeseries",
    description: str = "",
    stack: bool = False,
    instant: bool = False,
) -> dict:
    panel = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [
            {
                "datasource": DS,
                "expr": expr,
                "legendFormat": legend,
                "refId": chr(ord("A") + i),
                "instant": instant,
                "range": not instant,
                **({"format": "table"} if kind == "table" else {}),
            }
            for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries":
        panel["fieldConfig"]["defaults"]["custom"] = {
            "stacking": {"mode": "normal" if stack else "none"},
            "fillOpacity": 20 if stack else 0,
        }
    if kind == "table":
        panel["transformations"] = [{"id": "merge", "options": {}}]
    return panel


def _layout(panels: list[dict], width: int = 12, height: int = 8) -> list[dict]:
    for i, panel in enumerate(panels):
        panel["id"] = i + 1
        panel["gridPos"] = {
            "h": height,
            "w": width,
            "x": (i % (24 // width)) * width,
            "y": (i // (24 // width)) * height,
        }
    return panels


def _dashboard(
    uid: str,
    title: str,
    description: str,
    variables: list[dict],
    panels: list[dict],
    time_from: str = "now-6h",
) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["llem", "energy"],
        "schemaVersion": 38,
        "version": 1,
        "editable": True,
        "refresh": "1m",
        "time": {"from": time_from, "to": "now"},
        "timezone": "",
        "templating": {"list": [_var_datasource()] + variables},
        "annotations": {"list": []},
        "links": [],
        "panels": _layout(panels),
    }


NODE = 'node=~"$node"'


def nodes() -> dict:
    return _dashboard(
        "llem-nodes",
        "llem: nodes and running jobs",
        "Live power and energy of the nodes and their running jobs, from the llem node "
        "sampler's textfile (measured unless source says estimated).",
        [_var_query("node", "Node", "label_values(llem_node_running_jobs, node)")],
        [
            _panel(
                "Node power by component",
                [(f"sum by (component) (llem_node_power_watts{{{NODE}}})", "{{component}}")],
                unit="watt",
                stack=True,
                description="Mean power of each component over the sampler's last "
                "interval, summed over the selected nodes.",
            ),
            _panel(
                "Node power by node",
                [
                    (
                        f"sum by (node) (rate(llem_node_energy_joules_total{{{NODE}}}"
                        "[$__rate_interval]))",
                        "{{node}}",
                    )
                ],
                unit="watt",
                description="From the energy counters: exact over any range.",
            ),
            _panel(
                "Running jobs",
                [(f"sum by (node) (llem_node_running_jobs{{{NODE}}})", "{{node}}")],
                unit="short",
                stack=True,
            ),
            _panel(
                "Power of running jobs",
                [
                    (
                        f"sum by (jobid) (rate(llem_job_energy_joules_total{{{NODE}}}"
                        "[$__rate_interval]))",
                        "{{jobid}}",
                    )
                ],
                unit="watt",
                stack=True,
                description="Energy attributed to each running job, per second.",
            ),
            _panel(
                "Running jobs: energy so far",
                [
                    (
                        f"sum by (jobid, user, account, partition) "
                        f"(llem_job_energy_joules_total{{{NODE}}} * on (node, jobid) "
                        "group_left (user, account, partition) llem_job_info)",
                        "",
                    )
                ],
                unit="joule",
                kind="table",
                instant=True,
                description="Across the selected nodes; a job leaves at its Epilog.",
            ),
            _panel(
                "Share of node energy that is estimated",
                [
                    (
                        f'(sum(rate(llem_node_energy_joules_total{{{NODE},source="estimated"}}'
                        "[$__rate_interval])) or vector(0)) / "
                        f"sum(rate(llem_node_energy_joules_total{{{NODE}}}[$__rate_interval]))",
                        "estimated",
                    )
                ],
                unit="percentunit",
                description="0 where every device has a hardware energy counter.",
            ),
        ],
    )


ACCT = 'cluster=~"$cluster",account=~"$account"'


def accounts() -> dict:
    return _dashboard(
        "llem-accounts",
        "llem: accounts, energy and CO2e",
        "Energy and operational CO2e of finished jobs per account and partition, from the "
        "cluster ledger (llem metrics on the admin node).",
        [
            _var_query(
                "cluster", "Cluster", "label_values(llem_account_energy_joules_total, cluster)"
            ),
            _var_query(
                "account",
                "Account",
                'label_values(llem_account_energy_joules_total{cluster=~"$cluster"}, account)',
            ),
        ],
        [
            _panel(
                "Energy per account over time",
                [
                    (
                        f"sum by (account) (increase(llem_account_energy_joules_total{{{ACCT}}}"
                        "[$__rate_interval])) / 3600000",
                        "{{account}}",
                    )
                ],
                unit="kwatth",
                stack=True,
                description="Energy of the jobs merged into the ledger in each step.",
            ),
            _panel(
                "CO2e per account over time",
                [
                    (
                        f"sum by (account) (increase(llem_account_co2e_grams_total{{{ACCT}}}"
                        "[$__rate_interval])) / 1000",
                        "{{account}}",
                    )
                ],
                unit="masskg",
                stack=True,
                description="Operational: energy x PUE x grid intensity of each hour.",
            ),
            _panel(
                "Energy in the range, per account and partition",
                [
                    (
                        f"sum by (account, partition) (increase("
                        f"llem_account_energy_joules_total{{{ACCT}}}[$__range])) / 3600000",
                        "",
                    )
                ],
                unit="kwatth",
                kind="table",
                instant=True,
            ),
            _panel(
                "CO2e in the range, per account and partition",
                [
                    (
                        f"sum by (account, partition) (increase("
                        f"llem_account_co2e_grams_total{{{ACCT}}}[$__range])) / 1000",
                        "",
                    )
                ],
                unit="masskg",
                kind="table",
                instant=True,
            ),
            _panel(
                "Energy to date per account",
                [
                    (
                        f"sum by (account) (llem_account_energy_joules_total{{{ACCT}}}) / 3600000",
                        "{{account}}",
                    )
                ],
                unit="kwatth",
            ),
            _panel(
                "Measured and estimated energy to date",
                [
                    (
                        f"sum by (source) (llem_account_energy_joules_total{{{ACCT}}}) / 3600000",
                        "{{source}}",
                    )
                ],
                unit="kwatth",
                stack=True,
            ),
            _panel(
                "Carbon factors in use",
                [("max by (region, source, year, basis, pue) (llem_carbon_info)", "")],
                unit="short",
                kind="table",
                instant=True,
                description="The intensity source, year, basis and PUE behind the CO2e.",
            ),
        ],
        time_from="now-7d",
    )


def health() -> dict:
    return _dashboard(
        "llem-health",
        "llem: health",
        "Is llem measuring? Node samplers (ticks, gaps, sensor errors) and the admin node's "
        "aggregator (passes, quarantine, spool backlog).",
        [_var_query("node", "Node", "label_values(llem_sampler_interval_seconds, node)")],
        [
            _panel(
                "Sampler: age of the last tick, in intervals",
                [
                    (
                        f"(time() - llem_sampler_last_tick_timestamp_seconds{{{NODE}}}) / "
                        f"llem_sampler_interval_seconds{{{NODE}}}",
                        "{{node}}",
                    )
                ],
                unit="short",
                description="Above 2: the sampler stopped (it exits when the node has had "
                "no job for sampler.linger_s) or stalls.",
            ),
            _panel(
                "Sampler: uptime",
                [(f"time() - llem_sampler_start_time_seconds{{{NODE}}}", "{{node}}")],
                unit="s",
            ),
            _panel(
                "Sampler: gaps per device",
                [
                    (
                        f"sum by (node, device) (increase(llem_sampler_gaps_total{{{NODE}}}"
                        "[$__rate_interval]))",
                        "{{node}} {{device}}",
                    )
                ],
                unit="short",
            ),
            _panel(
                "Sampler: sensor errors per device",
                [
                    (
                        f"sum by (node, device) (increase(llem_sampler_sensor_errors_total"
                        f"{{{NODE}}}[$__rate_interval]))",
                        "{{node}} {{device}}",
                    )
                ],
                unit="short",
            ),
            _panel(
                "Sampler: intervals stored per minute",
                [
                    (
                        f"sum by (node) (rate(llem_sampler_intervals_total{{{NODE}}}"
                        "[$__rate_interval])) * 60",
                        "{{node}}",
                    )
                ],
                unit="short",
            ),
            _panel(
                "Aggregator: age of the last pass",
                [
                    ("time() - llem_aggregate_last_pass_timestamp_seconds", "age"),
                    ("llem_aggregate_last_pass_duration_seconds", "duration"),
                ],
                unit="s",
            ),
            _panel(
                "Aggregator: slices merged and quarantined",
                [
                    ("increase(llem_aggregate_slices_merged_total[$__rate_interval])", "merged"),
                    (
                        "increase(llem_aggregate_slices_quarantined_total[$__rate_interval])",
                        "quarantined",
                    ),
                    ("increase(llem_aggregate_passes_total[$__rate_interval])", "passes"),
                ],
                unit="short",
            ),
            _panel(
                "Spool: backlog and age of its oldest slice",
                [
                    ("llem_spool_slices", "slices waiting"),
                    ("time() - llem_spool_oldest_slice_timestamp_seconds", "oldest slice age (s)"),
                ],
                unit="short",
            ),
            _panel(
                "Ledger: job runs by status",
                [("sum by (status) (llem_ledger_jobs)", "{{status}}")],
                unit="short",
                stack=True,
                description="pending: waiting for slices of some of its nodes; "
                "incomplete: given up after aggregate.grace_s.",
            ),
        ],
    )


DASHBOARDS = {"llem-nodes.json": nodes, "llem-accounts.json": accounts, "llem-health.json": health}


def render(build) -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a JSON file differs from what this script builds",
    )
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = args.out / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
