"""The bench's surroundings: its own PostgreSQL, service processes, wrk, RSS.

Nothing here measures; it starts and stops things and runs the load
generator. Every process started here is stopped by the same object that
started it (by pid, never by name).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import asyncpg

from ledger.database import apply_schema, database_url_for, quote_ident, start_embedded_server

ROOT = Path(__file__).resolve().parent.parent
LUA = Path(__file__).resolve().parent / "lua"
ADMIN_KEY = "bench-admin-key-0123456789"
# `loyalty ...` as the console script runs it: importing `service` (under
# `python -m service` it would be `__main__`, a second copy of the module).
LOYALTY = [sys.executable, "-c", "import sys, service; sys.exit(service.main(sys.argv[1:]))"]
READY_TIMEOUT_S = 60.0
WRK_INSTALL_HINT = (
    "wrk (the load generator) is missing. Install it from Debian's packages:\n"
    "    apt-get install -y wrk        (as root, or with sudo)\n"
    "then run the bench again."
)


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        print(WRK_INSTALL_HINT, file=sys.stderr)
        raise SystemExit(2)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the database ----------------------------------------------------------------


class Database:
    """A PostgreSQL server for the bench: BENCH_DATABASE_URL, or a throwaway embedded one."""

    def __init__(self) -> None:
        self.server = None
        self.created: list[str] = []
        url = os.environ.get("BENCH_DATABASE_URL")
        if url:
            self.server_url = url
            self.kind = "BENCH_DATABASE_URL"
        else:
            self.tempdir = tempfile.mkdtemp(prefix="loyalty-bench-")
            self.server = start_embedded_server(Path(self.tempdir) / "pgdata", throwaway=True)
            self.server_url = self.server.get_uri()
            self.kind = "embedded PostgreSQL (throwaway, under a temp dir)"

    async def fresh(self, name: str, schema: bool = True) -> str:
        """A new empty database ``name`` (dropped first if left over), with the schema applied."""
        conn = await asyncpg.connect(self.server_url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {quote_ident(name)}")
            self.server_version = await conn.fetchval("SHOW server_version")
        finally:
            await conn.close()
        self.created.append(name)
        url = database_url_for(self.server_url, name)
        if schema:
            conn = await asyncpg.connect(url)
            try:
                await apply_schema(conn)
            finally:
                await conn.close()
        return url

    async def drop_all(self) -> None:
        conn = await asyncpg.connect(self.server_url)
        try:
            for name in self.created:
                await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        finally:
            await conn.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.cleanup()
            self.server = None


# -- processes ---------------------------------------------------------------------


@dataclass
class Process:
    """A child process (the service or the no-op server) on a port of its own."""

    argv: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self, ready_path: str | None = "/healthz") -> "Process":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if ready_path is None:  # no HTTP to ask: a worker
            return self
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{ready_path}", timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.argv} was not ready within {READY_TIMEOUT_S} s; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def service_process(database_url: str, log_dir: Path, extra_env: dict[str, str] | None = None, port: int | None = None) -> Process:
    port = port or free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "LOYALTY_HOST": "127.0.0.1",
        "LOYALTY_PORT": str(port),
        "LOYALTY_ADMIN_KEY": ADMIN_KEY,
        "LOYALTY_RATE_LIMIT": "off",
        "LOYALTY_SCHEDULER": "off",
        "LOYALTY_LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    return Process([*LOYALTY, "serve"], env, port, log_dir / f"service-{port}.log")


def projector_process(database_url: str, log_dir: Path, only: Sequence[str] = ()) -> Process:
    """``loyalty project``: the projectors (``only`` these, when given) in a process of their own."""
    env = {**os.environ, "DATABASE_URL": database_url, "LOYALTY_LOG_LEVEL": "WARNING"}
    only_args = [arg for name in only for arg in ("--only", name)]
    return Process([*LOYALTY, "project", *only_args], env, 0, log_dir / f"projector-{time.time_ns()}.log")


def noop_process(log_dir: Path) -> Process:
    port = free_port()
    return Process([sys.executable, "-m", "bench.noop", str(port)], dict(os.environ), port, log_dir / f"noop-{port}.log")


def lean_process(database_url: str, log_dir: Path, prefix: str, members: int) -> Process:
    """``bench/lean.py`` on its own database, members ``prefix0`` .. enrolled before it answers /healthz."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.lean", str(port), database_url, prefix, str(members)]
    return Process(argv, dict(os.environ), port, log_dir / f"lean-{port}.log")


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[None]:
    try:
        for process in processes:
            process.start()
        yield
    finally:
        for process in processes:
            process.stop()


# -- memory ----------------------------------------------------------------------------


@dataclass
class RssSampler:
    """Samples a process's resident set size every ``interval_s`` in a thread."""

    pid: int
    interval_s: float = 0.5
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB)

    def __enter__(self) -> "RssSampler":
        import psutil

        self._process = psutil.Process(self.pid)
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss_mb = self._process.memory_info().rss / 2**20
            except Exception:  # the process ended
                return
            self.samples.append((round(time.monotonic() - self._started, 2), round(rss_mb, 1)))
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# -- wrk -----------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    errors: dict[str, int]
    non_2xx: int
    latency_ms: dict[str, float]  # p50, p90, p99, max, mean

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def wrk(url: str, script: str, args: list[str], *, connections: int, duration_s: float, threads: int = 1,
        timeout_s: int = 10) -> WrkResult:
    """Run wrk with one of bench/lua/*.lua; its ``done`` prints one JSON line we parse."""
    argv = [
        require_wrk(), "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration_s))}s",
        "--timeout", f"{timeout_s}s", "-s", str(LUA / script), url, "--", *args,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    out = done.stdout
    for line in out.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line[len("BENCH_JSON "):])
            duration_s = data["duration_us"] / 1e6
            return WrkResult(
                requests=data["requests"],
                duration_s=round(duration_s, 3),
                rps=round(data["requests"] / duration_s, 1),
                errors=data["errors"],
                non_2xx=data["errors"]["status"],
                latency_ms={k: round(v / 1000, 3) for k, v in data["latency_us"].items()},
            )
    raise RuntimeError(f"wrk printed no result:\n{out}")


async def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.2)
    return False
