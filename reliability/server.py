"""A real `pod serve` process on loopback for the reliability checks, and small HTTP helpers.

Every check talks to the server the way a client would (a subprocess, a port, HTTP), so what is measured is
what ships: uvicorn's signal handling, the middleware, the batcher, the ONNX runtime.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running server: its base URL, its process, and everything it printed so far (read by a thread)."""

    url: str
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (finish admitted requests, then exit); SIGKILL only if it hangs past `timeout`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def server_env(bundle: Path, port: int, **settings: object) -> dict[str, str]:
    """The environment `pod serve` reads its settings from (`POD_*`), one ONNX thread unless told otherwise."""
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "POD_BUNDLE": str(bundle),
        "POD_PORT": str(port),
        "POD_THREADS": "1",
        **{f"POD_{k.upper()}": str(v) for k, v in settings.items()},
    }


@contextmanager
def serve(bundle: Path, ready_timeout: float = 120.0, **settings: object) -> Iterator[Server]:
    """Start `pod serve` on a free loopback port, wait for /readyz, and always stop it afterwards."""
    import threading

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve"],
        env=server_env(bundle, port, **settings),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = Server(f"http://127.0.0.1:{port}", proc)
    reader = threading.Thread(target=lambda: server.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + ready_timeout
        while time.time() < deadline:
            try:
                if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                reader.join(5)
                raise RuntimeError(f"server exited with {proc.returncode}: {server.output[-3000:]}")
            time.sleep(0.2)
        else:
            raise RuntimeError("server did not become ready")
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(5)


def metric(url: str, name: str, labels: str | None = None) -> float:
    """One Prometheus sample (summed over label sets when `labels` is None; 0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    if labels is not None:
        m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0
    return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def known_users(bundle: Path) -> list[int]:
    """Users with a known history in the bundle: requests for them need no history in the body."""
    users = []
    for line in (Path(bundle) / "histories.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) > 1:
            users.append(int(parts[0]))
    return users
