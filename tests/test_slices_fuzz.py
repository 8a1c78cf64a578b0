"""Fuzz the slice validator and the aggregator's reader path with hypothesis (issue 20, item 8).

Valid slices of every kind, made by production code (a real node store exported by
``export_job``, ``header_slice_from_env``), are mutated at every path of the schema: values
replaced by other JSON (wrong types, huge and negative numbers, unicode, lone surrogates,
nesting), keys removed, and raw JSON text that Python cannot build as a value (integers of
thousands of digits, nesting thousands deep, ``1e999``, ``NaN``). The properties:

* :func:`read_candidate` accepts the file or gives a reason, and never raises;
* a reason is short (a slice of 60 MB must not make a 60 MB reason);
* ``llem aggregate`` never crashes: every malformed slice is quarantined and a good slice
  beside it is merged.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llem import slices
from llem.cluster.aggregate import aggregate_once
from llem.cluster.header import header_slice_from_env
from llem.cluster.readers import read_candidate
from tests.helpers.nodes import ENV, T0, S, job_slices, node_config

MAX_REASON = 600
RAW = "\x00RAW\x00"
"""A placeholder replaced by raw JSON text after encoding."""

RAW_TOKENS = [
    "1" * 4301,
    "-" + "9" * 4400,
    "1" * 100_000,
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "-0",
    "0.0",
    "1" * 20,
    "-" + "1" * 19,
    "[" * 5000 + "]" * 5000,
    '{"a":' * 3000 + "1" + "}" * 3000,
    '"\\ud800"',
    '"\\udfff\\ud800x"',
    '"\\u0000"',
    '"' + "x" * 100_000 + '"',
    "[" + ",".join(["1"] * 20_000) + "]",
]


@functools.lru_cache(maxsize=1)
def bases() -> dict[str, dict]:
    """One valid slice of each kind, written by production code."""
    tmp = Path(tempfile.mkdtemp(prefix="llem-fuzz-"))
    try:
        job = job_slices(tmp, "100", nodes=("n1",))[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    header = header_slice_from_env({**ENV, "SLURM_JOB_ID": "100"}, "c1", now_ns=T0 + 60 * S)
    hour = T0 // S // 3600 * 3600
    node = {
        "schema": slices.SCHEMA,
        "kind": "node",
        "cluster": "c1",
        "node": "n1",
        "created_ns": T0 + 7200 * S,
        "from_hour_s": hour,
        "as_of_ns": T0 + 7200 * S,
        "devices": job["devices"],
        "hours": [
            {
                "device": "nvml:GPU-a",
                "hour_s": hour,
                "measured_uj": 10**9,
                "attributed_uj": 5 * 10**8,
                "remainder_uj": 5 * 10**8,
                "intervals": 60,
                "gap_intervals": 0,
                "covered_ns": 3600 * S,
            }
        ],
    }
    for data in (job, header, node):
        slices.validate(data)
    return {"job": job, "header": header, "node": node}


def _places(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _places(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _places(v, prefix + (i,))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.sampled_from([-1, 0, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, T0, 3600])
    | st.text(max_size=20)
    | st.sampled_from(["", "n1", "1/../2", "a\nb", "\u202e", "é"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    """(file name, bytes): a valid slice with one to three mutations."""
    kind = draw(st.sampled_from(["job", "header", "node"]))
    base = bases()[kind]
    name = slices.file_name(base)
    data = copy.deepcopy(base)
    raw = None
    for _ in range(draw(st.integers(1, 3))):
        places = [p for p in _places(data) if p]
        place = draw(st.sampled_from(places))
        parent = data
        try:
            for key in place[:-1]:
                parent = parent[key]
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "replace", "delete", "raw", "add"]))
        if action == "delete" and isinstance(parent, dict):
            del parent[place[-1]]
        elif action == "raw" and raw is None:
            raw = draw(st.sampled_from(RAW_TOKENS))
            parent[place[-1]] = RAW
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(json_values)
        else:
            parent[place[-1]] = draw(json_values)
    text = json.dumps(data, sort_keys=True)
    if raw is not None:
        text = text.replace(json.dumps(RAW), raw, 1)
    return name, text.encode("utf-8", "surrogatepass")


def _write(spool: Path, name: str, body: bytes) -> Path:
    path = spool / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    return path


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated())
def test_read_candidate_accepts_or_gives_a_reason(tmp_path_factory, case):
    name, body = case
    spool = tmp_path_factory.mktemp("spool")
    cand = read_candidate(_write(spool, name, body))  # must not raise
    assert not cand.gone
    assert (cand.prepared is not None) + (cand.reason is not None) + (
        cand.newer is not None
    ) == 1, cand
    if cand.reason is not None:
        assert cand.reason and len(cand.reason) <= MAX_REASON, cand.reason[:2000]


@pytest.mark.parametrize("token", ["1" * 4301, "-" + "1" * 5000])
def test_a_4300_digit_integer_is_quarantined_not_fatal(tmp_path, token):
    """The attack of issue 20, item 8: one such slice used to abort every pass."""
    config = node_config(tmp_path)
    spool = Path(config.spool_dir)
    spool.mkdir(mode=0o700)
    job = copy.deepcopy(bases()["job"])
    job["job"]["cpus"] = RAW
    bad = json.dumps(job).replace(json.dumps(RAW), token).encode()
    good = job_slices(tmp_path / "good", "200", nodes=("n2",))[0]
    _write(spool, slices.file_name(job), bad)
    _write(spool, slices.file_name(good), slices.encode(good))
    result = aggregate_once(config)
    assert result.merged == 1
    assert [n for n, _ in result.quarantined] == [slices.file_name(job)]
    reason = result.quarantined[0][1]
    assert "digits" in reason and len(reason) <= MAX_REASON, reason
    assert (Path(config.spool_dir) / "quarantine" / slices.file_name(job)).exists()
    assert aggregate_once(config).quarantined == []  # the spool is not stuck


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(mutated(), min_size=1, max_size=4), st.sampled_from([0, 0, 0, 1]))
def test_an_aggregate_pass_never_crashes(tmp_path_factory, cases, readers):
    """Every malformed slice is quarantined, a valid one merged; the pass itself completes,
    whether slices are read in the aggregator or in a reader process."""
    tmp = tmp_path_factory.mktemp("agg")
    config = node_config(tmp, readers=readers)
    spool = Path(config.spool_dir)
    spool.mkdir(mode=0o700)
    names = set()
    for n, (name, body) in enumerate(cases):
        # distinct names (same kind, cluster, node), so every case is its own file
        parts = name.split(".")
        parts[4] = str(int(parts[4]) + n)
        name = ".".join(parts)
        names.add(name)
        _write(spool, name, body)
    result = aggregate_once(config)
    quarantined = {n for n, _ in result.quarantined}
    assert quarantined <= names
    assert len(quarantined) + len(result.newer) + result.merged + result.unchanged == len(names)
    assert all(len(r) <= MAX_REASON for _, r in result.quarantined)
    left = {e.name for e in os.scandir(spool) if e.is_file()}
    assert left == set(result.newer)  # nothing stuck in the spool


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated())
def test_validate_alone_accepts_or_raises_slice_error(case):
    """The validator's own contract, which the exporter relies on too (slices.checked)."""
    _, body = case
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return  # not JSON Python can hold: the reader's business (see above)
    try:
        slices.validate(data)
    except slices.SliceError as e:
        assert str(e) and len(str(e)) <= MAX_REASON, str(e)[:2000]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), st.text(alphabet=st.characters(), max_size=70)))
def test_a_value_in_a_reason_reads_as_reprlib_cuts_it(text):
    """The validator's fast path for short names says exactly what ``reprlib`` would."""
    assert slices._show(text) == slices._REPR.repr(text)
