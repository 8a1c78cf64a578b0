"""A real IPMI BMC for the tests: OpenIPMI's ``ipmi_sim`` on the loopback, serving DCMI power
readings through the module ``dcmi_power.c`` (built here against Debian's libopenipmi-dev).

ipmi_sim is the real simulator (RMCP/RMCP+ sessions, users, privileges); the module only
answers DCMI "Get Power Reading" from a file, the node's power being the hardware the tests
fake. Clients are the real FreeIPMI ``ipmi-dcmi`` and ``ipmitool`` over LAN.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SOURCE = Path(__file__).with_name("dcmi_power.c")
USER, PASSWORD = "admin", "llem-test"
HEADER = Path("/usr/include/OpenIPMI/mcserv.h")


class SimulatorMissing(RuntimeError):
    """ipmi_sim, gcc or the OpenIPMI headers are missing (scripts/install-ipmi.sh)."""


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bmc:
    """One ipmi_sim BMC; ``set(...)`` changes what the next DCMI power reading answers."""

    def __init__(self, base: Path) -> None:
        missing = [n for n in ("ipmi_sim", "gcc") if shutil.which(n) is None]
        if missing or not HEADER.exists():
            raise SimulatorMissing(
                f"missing {', '.join(missing) or HEADER}: run scripts/install-ipmi.sh as root"
            )
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.module = self.base / "dcmi_power.so"
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-O2"]
            + ["-o", str(self.module), str(SOURCE)],
            check=True,
            capture_output=True,
            text=True,
        )
        self.reading = self.base / "reading"
        self.set(watts=0)
        self.port = _free_udp_port()
        conf = self.base / "lan.conf"
        conf.write_text(
            'name "llemsim"\n'
            "set_working_mc 0x20\n"
            "  startlan 1\n"
            f"    addr 127.0.0.1 {self.port}\n"
            "    priv_limit admin\n"
            "    allowed_auths_callback none md5\n"
            "    allowed_auths_user none md5\n"
            "    allowed_auths_operator none md5\n"
            "    allowed_auths_admin none md5\n"
            "    guid a123456789abcdefa123456789abcdef\n"
            "  endlan\n"
            f'  user 2 true "{USER}" "{PASSWORD}" admin 10 none md5\n'
            f'loadlib "{self.module}" "{self.reading}"\n'
        )
        emu = self.base / "bmc.emu"
        emu.write_text(
            "mc_setbmc 0x20\n"
            "mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\n"
            "mc_enable 0x20\n"
        )
        self.log = (self.base / "ipmi_sim.log").open("w")
        self.proc = subprocess.Popen(
            ["ipmi_sim", "-n", "-c", str(conf), "-f", str(emu), "-s", str(self.base / "state")],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_up()

    def _wait_up(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ipmi_sim exited: {(self.base / 'ipmi_sim.log').read_text()}")
            r = subprocess.run(
                ["ipmitool", *self.ipmitool_args(), "mc", "info"],
                capture_output=True,
                text=True,
                timeout=30,
                env=self.env(),
            )
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("ipmi_sim did not answer within 20 s")

    def set(self, watts: int, **more: int) -> None:
        """The next readings' fields (watts, min, max, avg, period_ms, active, delay_ms, cc)."""
        words = {"watts": watts, **more}
        tmp = self.reading.with_name("reading.tmp")
        tmp.write_text(" ".join(f"{k}={v}" for k, v in words.items()) + "\n")
        os.replace(tmp, self.reading)

    def ipmitool_args(self) -> list[str]:
        """ipmitool's LAN arguments; the password comes from IPMI_PASSWORD (-E), see env()."""
        return ["-I", "lanplus", "-C", "3", "-H", "127.0.0.1", "-p", str(self.port)] + [
            "-U",
            USER,
            "-E",
        ]

    def freeipmi_args(self) -> list[str]:
        """ipmi-dcmi's LAN arguments, the password in a FreeIPMI config file."""
        conf = self.base / "freeipmi.conf"
        conf.write_text(f"password {PASSWORD}\n")
        conf.chmod(0o600)
        return [
            "-h",
            f"127.0.0.1:{self.port}",
            "-u",
            USER,
            "-l",
            "admin",
            "--driver-type=LAN",
            f"--config-file={conf}",
        ]

    def env(self) -> dict[str, str]:
        return {**os.environ, "IPMI_PASSWORD": PASSWORD}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
