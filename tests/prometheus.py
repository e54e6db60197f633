"""A real Prometheus server for tests (Debian's `prometheus` package; `.ci/run` installs it): it scrapes jetpipe
workers every second, evaluates the shipped alert rules, and answers PromQL over its HTTP API."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from pipeline.ops.devstack import free_port

BINARY = shutil.which("prometheus")


class Prometheus:
    def __init__(self, directory: Path, targets: list[str], rule_files: list[Path]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = directory / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [{"job_name": "jetpipe-workers", "static_configs": [{"targets": targets}]}]}))
        self.log = open(directory / "prometheus.log", "ab")
        self.proc = subprocess.Popen(
            [BINARY or "prometheus", f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def ready(self, timeout_s: float = 30) -> Prometheus:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.client.get("/-/ready").status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}")
            time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def query(self, expr: str) -> list[dict]:
        """The result of an instant query; AssertionError naming the query if Prometheus refuses it."""
        answer = self.client.get("/api/v1/query", params={"query": expr}).json()
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        """The single value of an instant query (None: no series)."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def rules(self) -> list[dict]:
        groups = self.client.get("/api/v1/rules").json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
