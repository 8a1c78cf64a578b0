"""Test seam: the tests' node daemon (tests/helpers/daemon.py: fake sensors, one running
job) in a process of its own, for attacks that need a process to exhaust (``python -m
tests.window_server_proc BASE_DIR JOB_ID SPARE_FDS``).

Once the daemon serves, the process lowers its own descriptor limit to what it has open
plus ``SPARE_FDS``, prints ``ready`` and serves until its stdin closes. Its log goes to
stderr.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
from pathlib import Path

from tests.helpers.daemon import Daemon


def main() -> None:
    base, job_id, spare = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    daemon = Daemon(base, linger_s=600.0)
    daemon.node.add_job_cgroup(job_id)
    daemon.prolog(job_id)
    daemon.start()
    used = len(os.listdir("/proc/self/fd"))
    limit = used + spare
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    print("ready", flush=True)
    sys.stdin.read()
    daemon.stop()


if __name__ == "__main__":
    main()
