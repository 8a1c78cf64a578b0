"""Test seam: ``llem sampler`` (``python -m tests.crash_sampler ARGS``) that dies at a chosen
point instead of at a moment chosen by a timer, so crash tests are deterministic.

``LLEM_TEST_CRASH_AFTER_COMMITS=N`` sets the point: the Nth committed interval. With
``LLEM_TEST_CRASH_POINT=commit`` (the default) the process ends with ``os._exit`` right after
that commit; with ``next-write`` it ends inside the next interval's transaction, once the
interval row is written and before its energy rows are (an interval in flight is lost).

Only tests set these variables and only this module reads them: production code never looks
at them. The hook is :attr:`llem.node.store.NodeStore.after_commit`, set on the class so that
it reaches the store the sampler opens itself (a function set on the class is called as a
method, with the store first).
"""

from __future__ import annotations

import os
import sys

from llem.cli import sampler
from llem.node.store import NodeStore

CRASH_EXIT = 86
"""The exit status of a crash at the chosen point (nothing else in the sampler uses it)."""


def install(commits: int, point: str) -> None:
    if point not in ("commit", "next-write"):
        raise SystemExit(f"LLEM_TEST_CRASH_POINT must be commit or next-write, not {point!r}")
    done = 0

    def after_commit(store: NodeStore, interval_id: int) -> None:
        nonlocal done
        done += 1
        if done < commits:
            return
        if point == "commit":
            os._exit(CRASH_EXIT)
        store.db.set_trace_callback(
            lambda sql: os._exit(CRASH_EXIT) if sql.startswith("INSERT INTO energy") else None
        )

    NodeStore.after_commit = after_commit


if __name__ == "__main__":
    # Taken out of the environment: llem's config refuses LLEM_ variables it does not know.
    install(
        int(os.environ.pop("LLEM_TEST_CRASH_AFTER_COMMITS")),
        os.environ.pop("LLEM_TEST_CRASH_POINT", "commit"),
    )
    sys.exit(sampler.main())
