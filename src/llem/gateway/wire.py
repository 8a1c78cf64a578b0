"""The gateway's wire format: one JSON line each way, and the strict parser of requests.

Client to gateway, one line of at most :data:`MAX_REQUEST_BYTES`::

    {"v": 1, "request": "<the request, JSON text>", "cred": "MUNGE:..."}

``cred`` (TCP only) is a MUNGE credential whose payload is the SHA-256 of the ``request``
text's UTF-8 bytes (:func:`request_digest`): the credential is bound to this one request.
The request itself::

    {"op": "acct", "cluster": "c1",
     "filter": {"clusters": [...] | null, "users": ..., "accounts": ..., "partitions": ...,
                "states": ..., "nodes": ..., "names": ..., "start_ns": int | null,
                "end_ns": int | null, "jobs": [[job, task | null, step | null], ...] | null},
     "allocations": false, "duplicates": false, "totals_by": null, "statement": false,
     "fields": ["JobID", ...] | null}

``op`` is ``acct`` (a query), ``report`` (``{"report": {...}}``, the options of ``llem
report``), ``job`` (``{"job": {"id": "1234" | "1234_7", "cluster": str | null}}``: ``llem job
JOBID``; a null cluster is the request's, else the one other cluster that has the job; the
answer's ``view`` is the ``llem.job/1`` document), ``whoami`` (who the gateway thinks you are and what you may
see) or ``ping``. Gateway to client, one line: ``{"ok": true, "identity": {...}, "answer":
{llem.acct/1 document}, "footer": str | null, "notes": [...]}`` or ``{"ok": false,
"error": "...", "busy": true?}``.

:func:`parse_envelope` and :func:`parse_request` never raise anything but
:class:`llem.sockserve.Refused`, whatever the bytes (``tests/test_gateway_fuzz.py``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from llem.acct.fields import FIELDS, TOTAL_FIELDS, TOTAL_KEYS
from llem.acct.options import STATE_ALIASES
from llem.cluster.acct_queries import JobSpec, RunFilter
from llem.sockserve import Refused

VERSION = 1
DEFAULT_PORT = 6880
"""The gateway's TCP port when ``llem://HOST`` or ``gateway.listen`` names none."""
MAX_REQUEST_BYTES = 256 * 1024
"""One request line, credential included (a long -j or -N list fits)."""
MAX_ITEMS = 10_000
"""Items in one list of the filter."""
MAX_ITEM_CHARS = 256
"""Characters of one item (a name, an account, a node)."""
MAX_CRED_CHARS = 4096
OPS = ("acct", "report", "job", "whoami", "ping")
REPORT_FORMATS = ("md", "csv", "json", "html")
_LISTS = ("clusters", "users", "accounts", "partitions", "states", "nodes", "names", "qos")
_FLAGS = ("allocations", "duplicates", "statement", "truncate")
WINDOWS = ("overlap", "eligible", "submit", "state")
"""How a run is selected by time (``RunFilter.window``: sacct's rules, docs/acct.md)."""
MAX_TIMELIMIT_MIN = 10**9
MAX_REPORT_YEARS = 40
"""Longest report period: a report's carbon factors (one per clock hour of the period and
of the previous one) are built before the query's time bound applies and then loaded into a
temp table; 40 years and their previous 40 are 702,720 hours: 0.23 s to build, 1.9 s
(SQLite) or 2.2 s (PostgreSQL) to load."""
MAX_REPORT_NS = MAX_REPORT_YEARS * 366 * 86400 * 10**9
_ALL_FIELDS = frozenset(FIELDS) | frozenset(TOTAL_FIELDS)


@dataclass(frozen=True)
class Envelope:
    request_text: str
    cred: str | None


@dataclass(frozen=True)
class Request:
    """A checked request. ``filter`` never carries a visibility: the gateway adds it."""

    op: str
    cluster: str | None = None
    filter: RunFilter = RunFilter()
    allocations: bool = False
    duplicates: bool = False
    totals_by: str | None = None
    statement: bool = False
    truncate: bool = False
    fields: tuple[str, ...] | None = None
    report: ReportRequest | None = None
    job: JobRequest | None = None


@dataclass(frozen=True)
class JobRequest:
    """``llem job JOBID [--cluster C]``: ``cluster`` None is the request's cluster (or the
    one other cluster that has the job)."""

    job_id: str
    cluster: str | None = None


@dataclass(frozen=True)
class ReportRequest:
    """``llem report monthly|account``'s options: the period as the client computed it."""

    start_ns: int
    end_ns: int
    label: str
    kind: str = "month"
    account: str | None = None
    idle_w: float = 100.0
    top: int = 20
    format: str = "json"


def request_digest(request_text: str) -> bytes:
    """The MUNGE payload that binds a credential to one request."""
    return hashlib.sha256(request_text.encode("utf-8", "surrogatepass")).hexdigest().encode()


def encode_envelope(request_text: str, cred: str | None) -> bytes:
    doc: dict = {"v": VERSION, "request": request_text}
    if cred is not None:
        doc["cred"] = cred
    return (json.dumps(doc) + "\n").encode()


def request_text(request: Request) -> str:
    """The request as the JSON text a client sends."""
    f = request.filter
    doc = {
        "op": request.op,
        "cluster": request.cluster,
        "filter": {
            **{name: _list_or_none(getattr(f, name)) for name in _LISTS},
            "start_ns": f.start_ns,
            "end_ns": f.end_ns,
            "jobs": [[s.job_id, s.task_id, s.step] for s in f.jobs] if f.jobs is not None else None,
            "window": f.window,
            "groups": list(f.groups) if f.groups is not None else None,
            "timelimit_min": f.timelimit_min,
            "timelimit_max": f.timelimit_max,
        },
        "allocations": request.allocations,
        "duplicates": request.duplicates,
        "totals_by": request.totals_by,
        "statement": request.statement,
        "truncate": request.truncate,
        "fields": list(request.fields) if request.fields is not None else None,
    }
    if request.job is not None:
        doc = {
            "op": request.op,
            "cluster": request.cluster,
            "job": {"id": request.job.job_id, "cluster": request.job.cluster},
        }
    if request.report is not None:
        r = request.report
        doc = {
            "op": request.op,
            "cluster": request.cluster,
            "report": {
                "start_ns": r.start_ns,
                "end_ns": r.end_ns,
                "label": r.label,
                "kind": r.kind,
                "account": r.account,
                "idle_w": r.idle_w,
                "top": r.top,
                "format": r.format,
            },
        }
    return json.dumps(doc, separators=(",", ":"))


def _list_or_none(values):
    return list(values) if values is not None else None


def _loads(text: str | bytes, what: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise Refused(f"bad {what}: nested too deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(f"bad {what}: not JSON ({str(e)[:80]})") from None


def parse_envelope(line: bytes) -> Envelope:
    """The envelope of one request line; Refused when malformed."""
    if len(line) > MAX_REQUEST_BYTES:
        raise Refused(f"requests are at most {MAX_REQUEST_BYTES} bytes")
    doc = _loads(line, "request")
    if not isinstance(doc, dict):
        raise Refused("bad request: not a JSON object")
    if doc.get("v") != VERSION:
        raise Refused(
            f"unsupported protocol version {str(doc.get('v'))[:20]!r} (this is {VERSION})"
        )
    text = doc.get("request")
    if not isinstance(text, str):
        raise Refused("bad request: 'request' must be the request's JSON text")
    cred = doc.get("cred")
    if cred is not None and (not isinstance(cred, str) or len(cred) > MAX_CRED_CHARS):
        raise Refused("bad request: 'cred' must be a MUNGE credential")
    return Envelope(text, cred)


def parse_request(text: str) -> Request:
    """The request, checked field by field; Refused with the reason otherwise."""
    doc = _loads(text, "request")
    if not isinstance(doc, dict):
        raise Refused("bad request: not a JSON object")
    op = doc.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise Refused(f"unknown op {str(op)[:20]!r}")
    cluster = doc.get("cluster")
    if cluster is not None:
        cluster = _item(cluster, "cluster")
    if op == "report":
        return Request(op=op, cluster=cluster, report=_report(doc.get("report")))
    if op == "job":
        return Request(op=op, cluster=cluster, job=_job(doc.get("job")))
    if op != "acct":
        return Request(op=op, cluster=cluster)
    raw = doc.get("filter", {})
    if not isinstance(raw, dict):
        raise Refused("bad request: 'filter' must be an object")
    unknown = (
        set(raw)
        - set(_LISTS)
        - {
            "start_ns",
            "end_ns",
            "jobs",
            "window",
            "groups",
            "timelimit_min",
            "timelimit_max",
        }
    )
    if unknown:
        raise Refused(f"bad request: unknown filter key {str(sorted(unknown)[0])[:40]!r}")
    lists = {name: _list(raw.get(name), name) for name in _LISTS}
    if lists["states"] is not None:
        known = set(STATE_ALIASES.values())
        bad = [s for s in lists["states"] if s not in known]
        if bad:
            raise Refused(f"bad request: unknown state {bad[0][:20]!r}")
    f = RunFilter(
        **lists,
        start_ns=_ns(raw.get("start_ns"), "start_ns"),
        end_ns=_ns(raw.get("end_ns"), "end_ns"),
        jobs=_jobs(raw.get("jobs")),
        window=_window(raw.get("window", "overlap")),
        groups=_gids(raw.get("groups")),
        timelimit_min=_minutes(raw.get("timelimit_min"), "timelimit_min"),
        timelimit_max=_minutes(raw.get("timelimit_max"), "timelimit_max"),
    )
    flags = {}
    for name in _FLAGS:
        value = doc.get(name, False)
        if not isinstance(value, bool):
            raise Refused(f"bad request: '{name}' must be true or false")
        flags[name] = value
    totals_by = doc.get("totals_by")
    if totals_by is not None and (not isinstance(totals_by, str) or totals_by not in TOTAL_KEYS):
        raise Refused(f"bad request: unknown totals key {str(totals_by)[:20]!r}")
    fields = _list(doc.get("fields"), "fields")
    if fields is not None and not set(fields) <= _ALL_FIELDS:
        raise Refused(f"bad request: unknown field {sorted(set(fields) - _ALL_FIELDS)[0]!r}")
    return Request(op=op, cluster=cluster, filter=f, totals_by=totals_by, fields=fields, **flags)


def _window(value) -> str:
    if not isinstance(value, str) or value not in WINDOWS:
        raise Refused(f"bad request: 'window' is one of {', '.join(WINDOWS)}")
    return value


def _gids(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise Refused(f"bad request: 'groups' must be a list of at most {MAX_ITEMS} gids")
    if not all(type(g) is int and 0 <= g < 2**32 for g in value):
        raise Refused("bad request: 'groups' items must be gids (0 to 2^32 - 1)")
    return tuple(value)


def _minutes(value, name: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= MAX_TIMELIMIT_MIN:
        raise Refused(f"bad request: '{name}' must be minutes, 0 to {MAX_TIMELIMIT_MIN}")
    return value


def _report(raw) -> ReportRequest:
    if not isinstance(raw, dict):
        raise Refused("bad request: 'report' must be an object")
    start, end = _ns(raw.get("start_ns"), "start_ns"), _ns(raw.get("end_ns"), "end_ns")
    if start is None or end is None or end <= start:
        raise Refused("bad request: a report needs a period (start_ns before end_ns)")
    if end - start > MAX_REPORT_NS:
        raise Refused(f"bad request: a report covers at most {MAX_REPORT_YEARS} years")
    label = _item(raw.get("label"), "label")
    kind = raw.get("kind")
    if kind not in ("month", "range"):
        raise Refused("bad request: the period's kind is month or range")
    account = raw.get("account")
    if account is not None:
        account = _item(account, "account")
    idle_w = raw.get("idle_w")
    if type(idle_w) not in (int, float) or not 0 <= idle_w <= 1e6:
        raise Refused("bad request: 'idle_w' must be watts, 0 to 1e6")
    top = raw.get("top")
    if type(top) is not int or not 1 <= top <= 10_000:
        raise Refused("bad request: 'top' must be 1 to 10000")
    fmt = raw.get("format")
    if not isinstance(fmt, str) or fmt not in REPORT_FORMATS:
        raise Refused(f"bad request: the report format is one of {', '.join(REPORT_FORMATS)}")
    return ReportRequest(start, end, label, kind, account, float(idle_w), top, fmt)


def _job(raw) -> JobRequest:
    from llem.slices import is_identifier

    if not isinstance(raw, dict) or set(raw) - {"id", "cluster"}:
        raise Refused("bad request: 'job' must be an object with 'id' and 'cluster'")
    job_id = raw.get("id")
    if not isinstance(job_id, str) or len(job_id) > 64 or not is_identifier(job_id):
        raise Refused("bad request: 'job.id' must be a Slurm job id such as 1234 or 1234_7")
    cluster = raw.get("cluster")
    if cluster is not None:
        cluster = _item(cluster, "job.cluster")
    return JobRequest(job_id, cluster)


def _item(value, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ITEM_CHARS:
        raise Refused(
            f"bad request: '{name}' items must be texts of 1 to {MAX_ITEM_CHARS} characters"
        )
    if "\x00" in value:
        raise Refused(f"bad request: '{name}' items may not contain NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Refused(f"bad request: '{name}' items must be valid Unicode") from None
    return value


def _list(value, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise Refused(f"bad request: '{name}' must be a list of at most {MAX_ITEMS} texts")
    return tuple(_item(v, name) for v in value)


def _ns(value, name: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value < 2**63:
        raise Refused(f"bad request: '{name}' must be nanoseconds since the epoch")
    return value


def _jobs(value) -> tuple[JobSpec, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise Refused(f"bad request: 'jobs' must be a list of at most {MAX_ITEMS} job ids")
    specs = []
    for item in value:
        if not isinstance(item, list) or len(item) != 3:
            raise Refused("bad request: a job is [job_id, task_id or null, step or null]")
        job, task, step = item
        if not isinstance(job, str) or not job.isascii() or not job.isdigit() or len(job) > 20:
            raise Refused("bad request: job ids are digits")
        if task is not None and (
            not isinstance(task, str) or not task.isascii() or not task.isdigit() or len(task) > 20
        ):
            raise Refused("bad request: array task ids are digits")
        if step is not None:
            step = _item(step, "jobs")
        specs.append(JobSpec(job, task, step))
    return tuple(specs)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``HOST`` (port :data:`DEFAULT_PORT`)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(DEFAULT_PORT)
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host or "0.0.0.0", int(port)
