"""Names are users' own: printing them must not forge output or control a terminal.

The attacks replayed here (issue 20, items 7 and 10): a window name with a newline and the
``|`` delimiter forged a ``llem-acct -P`` row claiming 999.99 TJ for another user's job; a job
name with escape sequences set everyone's window title and cleared their screen; ``llem
report`` wrote through a symlink planted at its predictable temporary name; ``sampler.log``
was world-readable. The ledger is built by the production path: a real node store, the real
export, the real aggregator.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import stat
import sys
import time

import pytest

from llem.cli.acct import acct
from llem.cli.main import run
from llem.cluster.aggregate import aggregate_once
from llem.node.export import export_job
from llem.safetext import markdown_cell, safe_text
from tests.helpers.nodes import GPU_KEY, T0, S, build_store, node_config, spool_slice

ESC = "\x1b"
# Set the window title, then clear the screen and home the cursor.
JOB_NAME = f"evil{ESC}]0;pwned\x07{ESC}[2J{ESC}[H<b>bold</b>|x"
# A newline, then a -P row of its own: "another user's job used 999.99 TJ".
FORGED_ROW = "4242|mallory|999.99T"
WINDOW_NAME = "w\n" + FORGED_ROW
WHEN = ("-S", "2023-11-14", "-E", "2023-11-16")


# -- the one rule --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("plain name-1.2_x", "plain name-1.2_x"),
        ("a\nb\rc\td", "a\\nb\\rc\\td"),
        (f"{ESC}]0;t\x07", "\\x1b]0;t\\x07"),
        ("\x00\x7f\x85\x9b", "\\x00\\x7f\\x85\\x9b"),  # NUL, DEL, NEL and CSI (C1)
        ("tx\u202etxt.exe", "tx\\u202etxt.exe"),  # right-to-left override
        ("\u2066a\u2069\u200f\u061c", "\\u2066a\\u2069\\u200f\\u061c"),  # isolates and marks
        ("a\u2028b", "a\\u2028b"),  # a line separator: str.splitlines() breaks there
        ("back\\slash", "back\\\\slash"),  # so that "\\n" in a name is not read as a newline
        ("sur\udc80", "sur\\udc80"),  # a lone surrogate would make print() raise
        ("Zoë 東京 ✓", "Zoë 東京 ✓"),  # printable Unicode is kept
        (None, ""),
        (12.5, "12.5"),
    ],
)
def test_safe_text_escapes_what_controls_a_terminal_and_keeps_the_rest(raw, shown):
    assert safe_text(raw) == shown


def test_safe_text_escapes_the_delimiter_and_is_unambiguous():
    assert safe_text("a|b", "|") == "a\\x7cb"
    assert safe_text("a:;b", "::") == "a\\x3a;b"
    # Different names never print alike.
    names = ["a\nb", "a\\nb", "a\\\nb", "a|b", "a\\x7cb"]
    assert len({safe_text(n, "|") for n in names}) == len(names)


def test_markdown_cell_escapes_markup_and_html():
    assert markdown_cell("a|b") == "a\\|b"
    assert markdown_cell("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)&gt;"
    assert (
        markdown_cell("[click](javascript:x) *b* `c` _d_")
        == "\\[click\\](javascript:x) \\*b\\* \\`c\\` \\_d\\_"
    )
    assert markdown_cell(f"x{ESC}[2J") == "x\\\\x1b\\[2J"


# -- a ledger from the production path --------------------------------------------------------


@pytest.fixture
def forged_ledger(tmp_path, monkeypatch):
    """Alice's job 100, whose job name and window name are hostile, merged into a ledger by
    the real export and aggregate; LLEM_CONFIG names the ledger."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    cfg = node_config(tmp_path, "n1")
    store, run_id = build_store(
        tmp_path / "store" / "node.db", job_id="100", name=JOB_NAME, windows=False
    )
    window = store.open_window(run_id, "100", "0", WINDOW_NAME, 1000, 4321, T0 + 1900 * S, 1, {})
    store.close_window(window, T0 + 2500 * S, 5, {}, {GPU_KEY: 135_000_000})
    spool_slice(cfg, export_job(store, run_id, cfg, now_ns=T0 + 10 * 3600 * S))
    store.close()
    res = aggregate_once(cfg, now_ns=T0 + 10 * 3600 * S)
    assert (res.merged, res.quarantined) == (1, [])
    config_file = tmp_path / "llem.yaml"
    config_file.write_text(
        f"cluster: c1\nledger: {cfg.ledger}\ncarbon:\n  region: DE\n  intensity_g_per_kwh: 400\n"
    )
    monkeypatch.setenv("LLEM_CONFIG", str(config_file))
    yield cfg
    monkeypatch.undo()
    time.tzset()


def acct_run(*args: str) -> tuple[int, str, str]:
    """``llem-acct ARGS`` in-process, through the CLI's one error handler."""
    out, err = io.StringIO(), io.StringIO()
    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        status = run(acct, list(args), prog_name="llem-acct")
    finally:
        sys.stdout, sys.stderr = real
    return status, out.getvalue(), err.getvalue()


FIELDS = "JobID,JobName,User,ConsumedEnergy,State"


@pytest.mark.parametrize("flag, trailing", [("-P", ""), ("-p", "|")])
def test_a_window_name_cannot_forge_a_parsable_row(forged_ledger, flag, trailing):
    status, out, _ = acct_run("-a", *WHEN, flag, "-o", FIELDS)
    assert status == 0
    lines = out.splitlines()
    # The header, the job and its window: three rows of five fields, nothing else.
    assert len(lines) == 3
    rows = [line.split("|") for line in lines]
    assert [len(r) for r in rows] == [5 + bool(trailing)] * 3
    assert [r[0] for r in rows] == ["JobID", "100", "100.w\\n4242\\x7cmallory\\x7c999.99T"]
    assert not any(r[0].startswith("4242") for r in rows)
    assert all(r[2] == "alice" for r in rows[1:])
    assert rows[1][1] == "evil\\x1b]0;pwned\\x07\\x1b[2J\\x1b[H<b>bold</b>\\x7cx"
    assert ESC not in out and "\x07" not in out


def test_another_delimiter_is_escaped_in_values(forged_ledger):
    status, out, _ = acct_run("-a", *WHEN, "-P", "--delimiter", ";", "-o", "JobID,JobName")
    assert status == 0
    assert out.splitlines()[1] == "100;evil\\x1b]0\\x3bpwned\\x07\\x1b[2J\\x1b[H<b>bold</b>|x"


def test_the_table_never_prints_a_control_character(forged_ledger):
    status, out, _ = acct_run("-a", *WHEN, "-o", "JobID%40,JobName%60,User")
    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 4  # header, dashes, job, window
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J" in lines[2]
    assert lines[3].split()[0] == "100.w\\n4242|mallory|999.99T"
    assert not any(c in out for c in (ESC, "\x07", "\r"))


def test_json_keeps_the_name_exactly(forged_ledger):
    status, out, _ = acct_run("-a", *WHEN, "--json", "-o", "JobID,JobName")
    assert status == 0
    assert [j["JobName"] for j in json.loads(out)["jobs"]][0] == JOB_NAME
    assert ESC not in out  # json.dumps escapes it as \u001b


# -- llem report -------------------------------------------------------------------------------


def report_run(*args: str) -> tuple[int, str, str]:
    from llem.cli.report import report

    out, err = io.StringIO(), io.StringIO()
    real = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        status = run(report, list(args), prog_name="llem report")
    finally:
        sys.stdout, sys.stderr = real
    return status, out.getvalue(), err.getvalue()


PERIOD = ("--since", "2023-11-14", "--until", "2023-11-16")


def test_report_markdown_escapes_names(forged_ledger):
    status, out, _ = report_run("monthly", *PERIOD, "--format", "md")
    assert status == 0
    assert ESC not in out and "\x07" not in out and "<b>" not in out
    (line,) = [x for x in out.splitlines() if "evil" in x]
    assert "evil\\\\x1b\\]0;pwned\\\\x07\\\\x1b\\[2J\\\\x1b\\[H&lt;b&gt;bold&lt;/b&gt;\\|x" in line
    # The row still has as many cells as its table's header.
    table = out[: out.index(line)].rsplit("\n\n", 1)[-1].splitlines()
    unescaped_bars = len(line.replace("\\|", "")) - len(line.replace("\\|", "").replace("|", ""))
    assert unescaped_bars == table[0].count("|")


def test_report_csv_is_valid_csv_without_control_characters(forged_ledger):
    status, out, _ = report_run("monthly", *PERIOD, "--format", "csv")
    assert status == 0
    assert ESC not in out and "\x07" not in out
    block = [b for b in out.split("# ") if "evil" in b][0]
    rows = list(csv.reader(io.StringIO(block.split("\n", 1)[1])))
    rows = [r for r in rows if r]
    assert len({len(r) for r in rows}) == 1
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J\\x1b[H<b>bold</b>|x" in sum(rows, [])


def test_report_json_keeps_the_name_exactly_and_escaped_by_the_encoder(forged_ledger):
    status, out, _ = report_run("monthly", *PERIOD, "--format", "json")
    assert status == 0
    assert ESC not in out and "\x07" not in out
    strings = []

    def walk(value):
        if isinstance(value, dict):
            value = list(value.values())
        if isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str):
            strings.append(value)

    walk(json.loads(out))
    assert JOB_NAME in strings


# -- llem wrap and llem doctor -------------------------------------------------------------------


def test_wrap_summary_escapes_the_window_name(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from llem.cli.wrap import wrap

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / "llem.yaml").write_text("sensors: [estimate]\n")
    monkeypatch.setenv("LLEM_CONFIG", str(tmp_path / "llem.yaml"))
    result = CliRunner().invoke(wrap, ["--name", JOB_NAME, "--", sys.executable, "-c", "0"])
    assert result.exit_code == 0, result.output
    summary = result.stderr if hasattr(result, "stderr") else result.output
    assert "evil\\x1b]0;pwned\\x07" in summary
    assert ESC not in summary and "\x07" not in summary


def test_doctor_escapes_problem_texts(monkeypatch):
    from llem.cli import doctor

    report = doctor.diagnose()
    report["problems"] = [f"job name {JOB_NAME}\nforged line"]
    text = doctor.render(report)
    assert ESC not in text and "\x07" not in text
    assert not any(line.startswith("forged line") for line in text.splitlines())
    assert text.splitlines()[-1].startswith("  - job name evil\\x1b]0;pwned")
    assert text.splitlines()[-1].endswith("\\nforged line")


# -- report files: never through a path someone else controls -------------------------------


def test_report_never_writes_through_a_planted_symlink(forged_ledger, tmp_path):
    out = tmp_path / "reports"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    base = "llem-report-c1-2023-11-14_to_2023-11-16"
    for name in (f".{base}.json.tmp", f"{base}.json"):  # the old temp name, the final name
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(victim)
    status, printed, err = report_run("monthly", *PERIOD, "--format", "json", "--out", str(out))
    assert status == 0, err
    assert victim.read_text() == "root's file\n"
    final = out / f"{base}.json"
    assert not final.is_symlink() and json.loads(final.read_text())["schema"]
    assert stat.S_IMODE(final.stat().st_mode) & 0o022 == 0


def test_report_refuses_an_output_folder_another_user_controls(forged_ledger, tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    status, _, err = report_run("monthly", *PERIOD, "--format", "json", "--out", str(link))
    assert status == 1 and "not a real directory" in err and list(real.iterdir()) == []
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    status, _, err = report_run("monthly", *PERIOD, "--format", "csv", "--out", str(shared))
    assert status == 1 and "writable by group or others" in err
    assert list(shared.iterdir()) == []


# -- sampler.log ----------------------------------------------------------------------------------


def test_sampler_log_and_its_rotations_are_root_only(tmp_path):
    from llem.cli.sampler import private_log_handler

    log_path = tmp_path / "sampler.log"
    log_path.write_text("from an older llem\n")
    log_path.chmod(0o644)
    old_rotation = tmp_path / "sampler.log.2"
    old_rotation.write_text("older\n")
    old_rotation.chmod(0o644)
    handler = private_log_handler(log_path, max_bytes=200, backups=2)
    logger = logging.getLogger("test.sampler.private")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for i in range(40):
            logger.warning("job %d of user alice named train", i)
    finally:
        logger.removeHandler(handler)
        handler.close()
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == ["sampler.log", "sampler.log.1", "sampler.log.2"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}


def test_sampler_log_is_never_opened_through_a_symlink(tmp_path):
    from llem.cli.sampler import private_log_handler

    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (tmp_path / "sampler.log").symlink_to(victim)
    with pytest.raises(OSError):
        private_log_handler(tmp_path / "sampler.log")
    assert victim.read_text() == "keep\n"


def test_a_delimiter_that_numbers_use_is_escaped_in_numbers_too(forged_ledger):
    status, out, _ = acct_run("-a", *WHEN, "-P", "--delimiter", ":", "-o", "JobID,Elapsed,User")
    assert status == 0
    assert out.splitlines()[1] == "100:01\\x3a00\\x3a00:alice"
    assert all(line.count(":") == 2 for line in out.splitlines())
