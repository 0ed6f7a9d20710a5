"""Real servers on 127.0.0.1 for the tests: an `mlflow server` process and moto's S3 server.

- `MlflowServer(tmp, ...)`: `mlflow server` with a SQLite backend in its own process group.
  `start()` waits for /health; `kill()` SIGKILLs it (an outage), `start()` again brings it back
  on the same port and backend; `stop()` ends it politely. Also a context manager (start/stop).
  Artifacts are proxied by default (`--artifacts-destination`: clients upload over HTTP, as the
  cluster recipe does); `proxied=False` uses `--default-artifact-root` (clients write directly).
- `S3Endpoint()`: moto's S3 server in a thread of this process; `stop()` / `start()` take it
  down and bring it back on the same port with the same buckets (an outage).
- `free_port()`: a free TCP port on 127.0.0.1.
- `start_cli(args, log, env)`: `python -m pipeline.run ARGS` as a subprocess in its own process
  group (its own local Ray), output to `log`; `finish(p)` waits and then `kill_group(p)` kills
  what is left of the group (the Ray workers of a killed driver); `cli_env` is its environment.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    def __init__(self, tmp: Path | str, *, backend: str | None = None,
                 artifacts: str | None = None, proxied: bool = True,
                 env: dict[str, str] | None = None, log: Path | str | None = None,
                 port: int | None = None, workers: int = 1):
        self.tmp = Path(tmp)
        self.port = port or free_port()
        self.db = self.tmp / "server.db"
        self.backend = backend or f"sqlite:///{self.db}"
        self.artifacts = artifacts or (self.tmp / "server-artifacts").as_uri()
        self.proxied, self.workers = proxied, workers
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log) if log else self.tmp / "server.log"
        # telemetry off; the caller's tracking URI must not leak into the server
        self.env = {**(os.environ if env is None else env), "MLFLOW_DISABLE_TELEMETRY": "true",
                    "DO_NOT_TRACK": "1"}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120, wait: bool = True) -> "MlflowServer":
        """Launch; with wait=False return at once (do other set-up, then `wait_healthy()`)."""
        flag = "--artifacts-destination" if self.proxied else "--default-artifact-root"
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", str(self.workers),
                 "--backend-store-uri", self.backend, flag, self.artifacts],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.tmp, start_new_session=True)  # it forks workers: one group to end
        return self.wait_healthy(timeout) if wait else self

    def wait_healthy(self, timeout: float = 120) -> "MlflowServer":
        assert self.proc is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mlflow server exited with {self.proc.returncode}:\n"
                                     f"{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server not healthy after {timeout:.0f} s:\n"
                                     f"{self.log.read_text()[-3000:]}")
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL the whole process group (an outage: nothing is flushed)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self.proc = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for what is left (workers that outlived the main process)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class S3Endpoint:
    """A ThreadedMotoServer that can be stopped and started again on the same port (moto's
    state lives in this process, so the bucket survives a restart, like a real S3 outage)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer  # test extra; imported only where used

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        self.url = f"http://{self.host}:{self.port}"
        self.up = True

    def stop(self):
        if self.up:
            self.server.stop()
            self.up = False

    def start(self):
        from moto.server import ThreadedMotoServer

        if not self.up:
            self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port,
                                             verbose=False)
            self.server.start()
            self.up = True



# --- pipeline.run as a subprocess -----------------------------------------------------------------


def cli_env(extra: dict | None = None) -> dict:
    """This environment for a `pipeline.run` subprocess with a fresh local Ray of its own, plus
    `extra` (a None value removes that variable)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray per driver
    for k, val in (extra or {}).items():
        if val is None:
            env.pop(k, None)
        else:
            env[k] = val
    return env


def start_cli(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    fh = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "pipeline.run", *args], cwd=REPO,
                            env=cli_env(env), stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = 400) -> int:
    try:
        return p.wait(timeout=timeout)
    finally:
        kill_group(p)


def kill_group(p: subprocess.Popen) -> None:
    """Kill what is left of the process group this test started (Ray workers of a killed driver)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["MlflowServer", "S3Endpoint", "free_port", "cli_env", "start_cli", "finish",
           "kill_group"]
