"""Real servers on 127.0.0.1 for the tests: an `mlflow server` process and moto's S3 server.

- `MlflowServer(tmp, ...)`: `mlflow server` with a SQLite backend in its own process group.
  `start()` waits for /health; `kill()` SIGKILLs it (an outage), `start()` again brings it back
  on the same port and backend; `stop()` ends it politely. Also a context manager (start/stop).
  Artifacts are proxied by default (`--artifacts-destination`: clients upload over HTTP, as the
  cluster recipe does); `proxied=False` uses `--default-artifact-root` (clients write directly).
- `S3Endpoint()`: moto's S3 server in a thread of this process; `stop()` / `start()` take it
  down and bring it back on the same port with the same buckets (an outage).
- `free_port()`: a free TCP port on 127.0.0.1.
- `Postgres(password)`: a real PostgreSQL (Debian's binaries) in a temporary folder: `initdb`
  (superuser `mlflow`, scram password), `pg_ctl start` on a free 127.0.0.1 port (its unix socket
  in that folder), `createdb(name)`, `dump(name)`, `stop()`. As root it runs the server as
  `nobody` (initdb refuses root); `postgres_missing()` says why it cannot run here, or "".
- `RecipeMlflowServer(tmp, env)`: `mlflow server` started by cluster/mlflow/mlflow-server.sh
  itself with the recipe's variables in `env` (same start/wait/kill/stop as `MlflowServer`).
- `start_cli(args, log, env)`: `python -m pipeline.run ARGS` as a subprocess in its own process
  group (its own local Ray), output to `log`; `finish(p)` waits and then `kill_group(p)` kills
  what is left of the group (the Ray workers of a killed driver); `cli_env` is its environment.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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



class RecipeMlflowServer(MlflowServer):
    """`mlflow server` as cluster/mlflow/mlflow-server.sh starts it: `env` holds the recipe's
    variables (MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_AUTH, ...) on top of
    this process's environment; the port is this object's. The script finds `mlflow` on PATH:
    this interpreter's bin folder first."""

    SCRIPT = REPO / "cluster" / "mlflow" / "mlflow-server.sh"

    def __init__(self, tmp: Path | str, env: dict[str, str], *, workers: int = 1,
                 log: Path | str | None = None, port: int | None = None):
        base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        super().__init__(tmp, env={**base, **env}, log=log, port=port, workers=workers)
        self.env.update({"MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(self.port),
                         "MLFLOW_WORKERS": str(workers),
                         "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                  self.env.get("PATH", "")])})

    def start(self, timeout: float = 120, wait: bool = True) -> "RecipeMlflowServer":
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(["bash", str(self.SCRIPT)], env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.tmp, start_new_session=True)
        return self.wait_healthy(timeout) if wait else self


def postgres_bindir() -> Path | None:
    """The folder of PostgreSQL's server binaries: `initdb` on PATH, else Debian's
    /usr/lib/postgresql/<major>/bin (not on PATH there), the newest major."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                  key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(dirs[-1]).parent if dirs else None


def postgres_missing() -> str:
    """Why `Postgres` cannot run on this machine ("" when it can)."""
    if postgres_bindir() is None:
        return "PostgreSQL's initdb not found (apt-get install postgresql; .ci/run does)"
    if os.geteuid() == 0:
        import pwd

        if shutil.which("runuser") is None:
            return "running as root without runuser: initdb refuses root"
        try:
            pwd.getpwnam("nobody")
        except KeyError:
            return "running as root without a `nobody` user to run PostgreSQL as"
    return ""


class Postgres:
    """A PostgreSQL server of its own: data and unix socket in a fresh /tmp folder (outside
    pytest's root-only tmp, so that `nobody` can use it), TCP on 127.0.0.1:`port`, superuser
    `mlflow` with a scram password (clients give it as PGPASSWORD, never in the URI)."""

    USER = "mlflow"

    def __init__(self, password: str):
        self.bindir, self.password = postgres_bindir(), password
        assert self.bindir is not None, postgres_missing()
        self.root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
        self.data, self.port = self.root / "data", free_port()
        # initdb and postgres refuse to run as root: as root, run them as nobody
        self.as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            import pwd

            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        self.env = {**os.environ, "PGPASSWORD": password, "LC_ALL": "C"}
        self.env.pop("PGDATABASE", None)

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        p = subprocess.run([*self.as_user, str(self.bindir / tool), *args], cwd=self.root,
                           env=self.env, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"{tool} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p.stdout

    def start(self) -> "Postgres":
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            os.chown(pwfile, *(os.stat(self.root)[4:6]))
        try:
            self._run("initdb", "-D", str(self.data), "-U", self.USER, f"--pwfile={pwfile}",
                      "--auth=scram-sha-256", "-E", "UTF8", "--no-locale", "--no-sync")
        finally:
            pwfile.unlink()
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={self.root} -c fsync=off")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "postgres.log"),
                  "-o", opts, "-w", "-t", "60", "start")
        return self

    def createdb(self, name: str) -> str:
        """Create database `name`; returns its URI (no password in it)."""
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER, name)
        return self.uri(name)

    def uri(self, name: str) -> str:
        return f"postgresql+psycopg2://{self.USER}@127.0.0.1:{self.port}/{name}"

    def dump(self, name: str) -> str:
        """Everything in database `name`, as SQL (pg_dump)."""
        return self._run("pg_dump", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.USER,
                         name)

    def stop(self) -> None:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop",
                      timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)



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


def processes_naming(marker: str) -> list[int]:
    """Pids whose command line names `marker` (a test cluster's private temp dir): what to kill
    without touching any other Ray on the machine."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            pids.append(int(proc.name))
    return pids


def signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


__all__ = ["MlflowServer", "S3Endpoint", "free_port", "cli_env", "start_cli", "finish",
           "kill_group", "processes_naming", "signal_pids", "RecipeMlflowServer", "Postgres",
           "postgres_bindir", "postgres_missing"]


def results_and_attempts(children: list) -> tuple[list, list, list[str]]:
    """(FINISHED runs, superseded attempts, problems) of a sweep's trial runs (MLflow `Run`s).
    A trial whose own MLflow logging failed part-way leaves its run RUNNING, which the driver
    marks KILLED after the phase, and the trial's storage record is replayed into a new FINISHED
    run tagged `replayed` (`pipeline.trainable.log_result`, by design; seen under load). Such a
    KILLED attempt is no problem beside that replayed result; any other non-FINISHED run is."""
    finished = [r for r in children if r.info.status == "FINISHED"]
    replayed = {r.data.tags.get("cell") for r in finished if r.data.tags.get("replayed") == "true"}
    attempts, problems = [], []
    for r in children:
        if r.info.status == "FINISHED":
            continue
        if r.info.status == "KILLED" and r.data.tags.get("cell") in replayed:
            attempts.append(r)
        else:
            problems.append(f"run {r.info.run_id} ({r.data.tags.get('cell')}, {r.info.status}, "
                            f"status_detail={r.data.tags.get('status_detail')!r}) is no result "
                            f"and was not replayed")
    return finished, attempts, problems
