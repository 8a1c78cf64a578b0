"""``llem serve``: the read-only ledger gateway (``llem-acct`` from any login node).

Parses the options and runs :class:`llem.gateway.server.Gateway` until SIGTERM or SIGINT.
"""

from __future__ import annotations

import logging
import os
import signal

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command("serve", context_settings=CONTEXT)
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    help="The Unix socket for local clients (default: gateway.socket).",
)
@click.option("--no-socket", is_flag=True, help="No Unix socket (TCP only).")
@click.option(
    "--listen",
    metavar="HOST[:PORT]",
    help="Also listen on TCP for remote clients with MUNGE credentials (default: "
    "gateway.listen; port 6880).",
)
@click.option("--ledger", metavar="PATH", help="The ledger (default: 'ledger' in the config).")
@click.option(
    "--allow-root",
    is_flag=True,
    help="Run as root anyway (the gateway should run as the unprivileged llem user).",
)
@click.option("--debug", is_flag=True, help="Log every request; show tracebacks of errors.")
def serve(
    socket_path: str | None,
    no_socket: bool,
    listen: str | None,
    ledger: str | None,
    allow_root: bool,
    debug: bool,
) -> int:
    """Serve the ledger read-only to llem-acct, private by default.

    Users see their own jobs, coordinators their accounts', admins everything (config
    'privacy', 'gateway.*'; docs/admin-install.md, "The ledger gateway"). Local clients are
    identified by the kernel (SO_PEERCRED), remote ones by a MUNGE credential per request.
    Runs until SIGTERM; logs to stderr (the journal, under systemd).
    """
    from dataclasses import replace

    from llem import config as config_mod
    from llem.errors import LlemError
    from llem.gateway.server import Gateway, parse_listen

    if os.geteuid() == 0 and not allow_root:
        raise LlemError(
            "llem serve runs as root: run it as the unprivileged llem user that may read the "
            "ledger (share/systemd/llem-gateway.service), or pass --allow-root"
        )
    # One line per request and refusal (the journal adds the time under systemd).
    logging.getLogger("llem.gateway").setLevel(logging.DEBUG if debug else logging.INFO)
    cfg = config_mod.load()
    if ledger:
        cfg = replace(cfg, ledger=ledger)
    address = listen if listen is not None else cfg.gateway.listen
    try:
        tcp = parse_listen(address) if address else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--listen'") from None
    path = None if no_socket else (socket_path or cfg.gateway.socket)
    if path is None and tcp is None:
        raise click.UsageError("nothing to listen on: give --listen or drop --no-socket")
    gateway = Gateway(cfg, socket_path=path, listen=tcp)
    from llem.wakeup import SignalSafeEvent

    stop = SignalSafeEvent()  # set by the handlers below: see llem.wakeup
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    gateway.start()
    where = [p for p in (path,) if p]
    if gateway.tcp_address is not None:
        where.append(f"{gateway.tcp_address[0]}:{gateway.tcp_address[1]}")
    logging.getLogger("llem.gateway.server").info(
        "gateway: serving %s (privacy: %s) on %s", cfg.ledger, cfg.privacy, ", ".join(where)
    )
    from llem.cluster.pg_ledger import is_postgres
    from llem.gateway.server import row_security_line

    line = row_security_line(cfg.ledger)
    if line is not None:
        log = logging.getLogger("llem.gateway.server")
        (log.info if ": on " in line else log.warning)("%s", line)
    if not is_postgres(cfg.ledger) and not os.access(cfg.ledger, os.R_OK):
        logging.getLogger("llem.gateway.server").warning(
            "gateway: cannot read the ledger %s yet (uid %d): queries will fail until it can",
            cfg.ledger,
            os.geteuid(),
        )
    stop.wait()
    gateway.close()
    return 0
