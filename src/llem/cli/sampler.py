"""``llem sampler``: the node sampler, standalone.

Kept free of click and of anything heavy: it starts on every job, so its imports are part of
the job's start-up cost (docs/performance.md has the figure). ``llem.cli.main`` hands
``llem sampler ...`` straight to :func:`main` before click is imported.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from llem import config as config_mod
from llem.errors import LlemError

log = logging.getLogger("llem.sampler")


def parse_args(argv: list[str]) -> argparse.Namespace:
    from llem.cli import argument_parser

    p = argument_parser(
        prog="llem sampler",
        description="Read this node's energy counters every interval into the node store.",
    )
    p.add_argument("--interval", type=float, help="seconds between reads (default from config)")
    p.add_argument("--store", type=Path, help="node store file (default STATE_DIR/node-NODE.db)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--node", help="run as the Slurm node sampler of NODE (started by the Prolog)")
    p.add_argument(
        "--daemon",
        action="store_true",
        help="with --node: log to RUN_DIR/NODE/sampler.log (stdio is /dev/null)",
    )
    p.add_argument("--verbose", "-v", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="llem sampler: %(levelname)s %(message)s",
    )
    try:
        return _run(args)
    except LlemError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1


LOG_MODE = 0o600
"""sampler.log is root's alone: it names every job, user and window of the node."""


def private_log_handler(path: Path, max_bytes: int = 1_000_000, backups: int = 2):
    """A rotating log handler whose files (the log and its rotated copies) are mode 0600,
    opened without following a symlink; a log left readable by an older version is closed
    to others too."""
    import logging.handlers

    class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
        def _open(self):
            fd = os.open(
                self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, LOG_MODE
            )
            os.fchmod(fd, LOG_MODE)
            return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)

    for i in range(1, backups + 1):
        try:
            fd = os.open(f"{path}.{i}", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.fchmod(fd, LOG_MODE)
        finally:
            os.close(fd)
    return PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups)


def _node_mode(args: argparse.Namespace) -> int:
    from llem.node.daemon import record_problem, run_node_sampler
    from llem.paths import NodePaths

    config = config_mod.load()
    paths = NodePaths.of(config, args.node)
    if args.daemon:
        paths.ensure()
        handler = private_log_handler(paths.run / "sampler.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root = logging.getLogger()
        root.handlers[:] = [handler]
    try:
        return run_node_sampler(config, args.node, args.interval)
    except Exception as e:
        log.exception("node sampler failed")
        record_problem(paths, f"node sampler failed: {type(e).__name__}: {e}")
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.node:
        return _node_mode(args)
    from llem.node.store import open_or_quarantine
    from llem.sampler import Sampler
    from llem.sensors import open_sensors

    config = config_mod.load()
    interval_s = args.interval if args.interval is not None else config.sampler.interval_s
    if interval_s < config_mod.MIN_INTERVAL_S:
        raise LlemError(f"--interval must be at least {config_mod.MIN_INTERVAL_S} s")
    try:
        os.nice(config.sampler.nice)
    except OSError:
        pass
    from llem.node.slurm import node_name
    from llem.paths import NodePaths

    path = args.store or NodePaths.of(config, node_name(os.environ)).store
    store, moved = open_or_quarantine(path)
    if moved is not None:
        log.error("corrupt node store moved to %s", moved)
    opened = open_sensors(config)
    for note in opened.notes:
        log.info("%s", note)
    sampler = Sampler(opened.sensors, [store], interval_s=interval_s)

    def on_signal(signum: int, frame: object) -> None:
        sampler.stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if args.duration is not None:
        timer = threading.Timer(args.duration, sampler.stop)
        timer.daemon = True
        timer.start()
    log.info("sampling %d devices every %.3g s into %s", len(sampler.devices), interval_s, path)
    try:
        sampler.run()
    finally:
        opened.close()
        store.close()
    log.info("stopped after %d intervals", sampler.intervals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
