"""Hosts for cross-host fault tests: Linux network namespaces on one bridge, made by the test (root only).

Each host is a network namespace with one interface on a bridge in the test's own namespace, which has the
bridge's address and plays the operator's machine. A link can be cut (both directions, as a pulled cable:
nothing is sent, not even a FIN or RST) and healed, and a host can be partitioned from some others while it
still reaches the rest (blackhole routes on both sides). Addresses are in 10.213.<lab>.0/24: only these
namespaces, made here, ever hold them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import kill_group

#: Why cross-host tests cannot run here, or None if they can.
UNAVAILABLE: str | None = None
if os.geteuid() != 0:
    UNAVAILABLE = "cross-host tests make network namespaces, which needs root (CI runs as root)"
elif shutil.which("ip") is None:
    UNAVAILABLE = "cross-host tests need iproute2's `ip` (Debian: iproute2)"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclasses.dataclass
class Host:
    lab: Lab
    name: str
    ns: str
    address: str
    veth: str  # the root-side end of its link, on the bridge
    procs: list[subprocess.Popen] = dataclasses.field(default_factory=list)

    def popen(self, args: list[str], *, env: dict | None = None, log: Path | None = None, user: str | None = None,
              cwd: str | Path | None = None) -> subprocess.Popen:
        """Start a process on this host (its own process group; killed when the lab closes)."""
        prefix = ["ip", "netns", "exec", self.ns] + (["runuser", "-u", user, "--"] if user else [])
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the process
        proc = subprocess.Popen(prefix + args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *args], capture_output=True, text=True, timeout=60,
                              **kwargs)

    def cut(self) -> None:
        """Pull its cable: nothing leaves or reaches it until `heal`."""
        _ip("link", "set", self.veth, "down")

    def heal(self) -> None:
        _ip("link", "set", self.veth, "up")

    def kill_all(self) -> None:
        """SIGKILL every process on this host (a host that is gone), those its processes started included."""
        for proc in self.procs:
            kill_group(proc)
        deadline = time.monotonic() + 10
        while (pids := _ip("netns", "pids", self.ns, check=False).stdout.split()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.1)


class Lab:
    """A bridge and the hosts on it; `close()` removes every namespace, link and process it made."""

    made = 0  # labs made by this process: each gets names and a subnet of its own

    def __init__(self, number: int):
        Lab.made += 1
        self.number = (number + Lab.made) % 250
        self.tag = f"jp{os.getpid() % 10000}x{Lab.made}"
        self.bridge = f"{self.tag}b"
        self.subnet = f"10.213.{self.number}"
        self.address = f"{self.subnet}.1"
        self.hosts: dict[str, Host] = {}
        self.partitions: list[tuple[Host, Host]] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 10
        ns, veth = f"{self.tag}-{name}", f"{self.tag}v{index}"
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge)
        _ip("link", "set", veth, "up")
        address = f"{self.subnet}.{index}"
        for args in (("addr", "add", f"{address}/24", "dev", "eth0"), ("link", "set", "eth0", "up"),
                     ("link", "set", "lo", "up")):
            _ip("-n", ns, *args)
        host = self.hosts[name] = Host(self, name, ns, address, veth)
        return host

    def partition(self, host: Host, others: list[Host]) -> None:
        """`host` and each of `others` can no longer reach each other (both directions); all else stays."""
        for other in others:
            _ip("-n", host.ns, "route", "add", "blackhole", f"{other.address}/32")
            _ip("-n", other.ns, "route", "add", "blackhole", f"{host.address}/32")
            self.partitions.append((host, other))

    def heal_partitions(self) -> None:
        for host, other in self.partitions:
            _ip("-n", host.ns, "route", "del", "blackhole", f"{other.address}/32", check=False)
            _ip("-n", other.ns, "route", "del", "blackhole", f"{host.address}/32", check=False)
        self.partitions.clear()

    def close(self) -> None:
        for host in self.hosts.values():
            host.kill_all()
        for host in self.hosts.values():
            _ip("netns", "del", host.ns, check=False)
            _ip("link", "del", host.veth, check=False)  # gone with its namespace, unless sockets linger
        _ip("link", "del", self.bridge, check=False)
