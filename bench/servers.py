"""Servers that bench scripts start and stop: a process on 127.0.0.1, a free port (passed as `--port`), up once a
readiness path answers 200, its output kept in a log file for when it is not."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, name: str, args: list[str], ready_path: str = "/health", timeout_s: float = 120,
                 env: dict[str, str] | None = None, cwd: Path | None = None, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)  # noqa: SIM115
        self.proc = subprocess.Popen([*args, "--port", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=cwd)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}{ready_path}", timeout=2).status_code == 200:
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}: see {self.log.name}")
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{name} was not ready after {timeout_s:.0f} s: see {self.log.name}")

    @property
    def model(self) -> str:
        """The first model it lists."""
        return str(httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"])

    def cpu_s(self) -> float:
        """CPU seconds the process has used so far (user + system)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, graceful: bool = False) -> None:
        """SIGTERM and up to a minute to finish when `graceful` (Qanat then drains and saves its cache), else kill."""
        if graceful:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
