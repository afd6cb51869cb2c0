"""The real service as a subprocess: start it on a free port, wait for /readyz, kill it.

Used by the crash, fault, cross-process and hostile-input tests (and by
bench/soak.py), which need what an in-process TestClient cannot give: a
process that can be SIGKILLed mid-write, two processes on one database, and
a real socket for schemathesis and slow clients.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServiceProcess:
    """One `loyalty serve` process on ``database_url``; ``admin_key`` is seeded at start.

    The port is kept across restarts so clients can keep their base URL.
    Its output goes to a file (``log_path``) so a test can look for secrets in it
    and so a full pipe never blocks the service.
    """

    def __init__(self, database_url: str, *, env: dict[str, str] | None = None, admin_key: str | None = None,
                 port: int | None = None, command: tuple[str, ...] = ("serve",)) -> None:
        self.database_url = database_url
        self.admin_key = admin_key or f"lk_admin_{secrets.token_urlsafe(24)}"
        self.port = port or free_port()
        self.extra_env = env or {}
        self.command = command
        self.process: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="loyalty-service-", suffix=".log")[1])
        self._log_file = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")}
        env.update(
            DATABASE_URL=self.database_url,
            LOYALTY_HOST="127.0.0.1",
            LOYALTY_PORT=str(self.port),
            LOYALTY_ADMIN_KEY=self.admin_key,
            LOYALTY_RATE_LIMIT="off",
            LOYALTY_SCHEDULER="off",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def spawn(self) -> None:
        """Start the process without waiting for it to be ready."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self._log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service", *self.command],
            cwd=ROOT,
            env=self.environment(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a signal to the test's group never reaches it by accident
        )

    async def start(self, timeout_s: float = START_TIMEOUT_S) -> "ServiceProcess":
        self.spawn()
        await self.wait_ready(timeout_s)
        return self

    async def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.output()[-4000:]}")
                try:
                    async with session.get(f"{self.url}/readyz") as response:
                        if response.status == 200:
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"the service was not ready within {timeout_s} s:\n{self.output()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL: no draining, no cleanup; whatever was in flight is cut."""
        self._signal(signal.SIGKILL)
        self._reap()

    async def terminate(self, timeout_s: float = 35.0) -> int:
        """SIGTERM and wait for a graceful exit (SIGKILL after ``timeout_s``)."""
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.process is not None and self.process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.process is not None and self.process.poll() is None:
            self.kill()
        return self._reap()

    async def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.kill()
        await self.start(timeout_s)

    def _signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.process.send_signal(sig)
            except ProcessLookupError:
                pass

    def _reap(self) -> int:
        code = self.process.wait(timeout=10) if self.process is not None else 0
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def rss_bytes(self) -> int:
        """Resident memory of the service process (Linux /proc)."""
        with open(f"/proc/{self.pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        self.kill()
        self.log_path.unlink(missing_ok=True)

    async def __aenter__(self) -> "ServiceProcess":
        return await self.start()

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:  # shown by pytest with the failure
            print(f"--- service log (tail) ---\n{self.output()[-6000:]}")
        self.close()


class Client:
    """A thin JSON client on one base URL with one key."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, key: str) -> None:
        self.session, self.base_url, self.key = session, base_url, key

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **extra}

    async def post(self, path: str, body=None, **headers: str) -> tuple[int, dict, dict]:
        async with self.session.post(self.base_url + path, json=body if body is not None else {},
                                     headers=self.headers(**headers)) as response:
            return response.status, await response.json(content_type=None), dict(response.headers)

    async def get(self, path: str, **params) -> tuple[int, dict, dict]:
        async with self.session.get(self.base_url + path, params=params, headers=self.headers()) as response:
            return response.status, await response.json(content_type=None), dict(response.headers)


async def create_key(session: aiohttp.ClientSession, service: ServiceProcess, role: str, name: str | None = None) -> str:
    client = Client(session, service.url, service.admin_key)
    status, body, _ = await client.post("/v1/api-keys", {"name": name or f"test-{role}", "role": role})
    assert status == 201, body
    return body["key"]


async def enrol_members(admin: Client, count: int) -> list[str]:
    """Members m0..m<count-1>, enrolled one request each."""
    members = [f"m{m}" for m in range(count)]
    for member in members:
        status, body, _ = await admin.post("/v1/members", {"member_id": member})
        assert status == 201, body
    return members


# -- what must hold of the log, checked through the public API ---------------------

# Event types whose natural id may appear once per member, and the field holding it.
NATURAL_IDS = {
    "member_enrolled": "member_id",
    "purchase_recorded": "purchase_id",
    "purchase_returned": "return_id",
    "points_redeemed": "redemption_id",
    "redemption_reversed": "redemption_id",
    "coupon_issued": "coupon_id",
    "points_adjusted": "adjustment_id",
}


async def read_all_events(client: Client, page_limit: int = 1000) -> list[dict]:
    """The whole global feed, page by page (the client's key must be auditor or admin)."""
    events: list[dict] = []
    after = 0
    for _page in range(100_000):
        status, body, _ = await client.get("/v1/events", after=after, limit=page_limit)
        assert status == 200, body
        events += body["events"]
        if body["next_after"] is None:
            return events
        after = body["next_after"]
    raise AssertionError("the feed never ended")


def assert_log_is_well_formed(events: list[dict]) -> None:
    """Positions 1..n without gaps; stream versions 1..k per member; natural ids once per member."""
    assert [e["position"] for e in events] == list(range(1, len(events) + 1))
    versions: dict[str, int] = {}
    seen: set[tuple[str, str, str]] = set()
    for event in events:
        stream = event["stream_id"]
        assert event["stream_version"] == versions.get(stream, 0) + 1, event
        versions[stream] = event["stream_version"]
        field_name = NATURAL_IDS.get(event["type"])
        if field_name is not None:
            natural = (stream, event["type"], event["data"][field_name])
            assert natural not in seen, f"natural id appended twice: {natural}"
            seen.add(natural)


def replayed_balances(events: list[dict], as_of) -> dict[str, dict]:
    """Each member's balance as of ``as_of`` from folding its events (the log alone)."""
    import msgspec

    from events.envelope import Envelope
    from ledger.application import fact_of
    from ledger.state import fold
    from ledger.views import balance

    facts: dict[str, list] = {}
    for event in events:
        envelope = msgspec.convert(event, Envelope)
        if envelope.occurred_at <= as_of and not envelope.stream_id.startswith("$"):  # $programme, $campaigns
            facts.setdefault(envelope.stream_id, []).append(fact_of(envelope))
    return {stream: msgspec.to_builtins(balance(fold(stream_facts), as_of)) for stream, stream_facts in facts.items()}


async def assert_balances_equal_replay(client: Client, events: list[dict], as_of) -> dict[str, dict]:
    """GET /balance of every member equals the fold of its events; no available balance is negative."""
    from events.codec import rfc3339

    expected = replayed_balances(events, as_of)
    for member_id, replayed in expected.items():
        status, served, _ = await client.get(f"/v1/members/{member_id}/balance", as_of=rfc3339(as_of))
        assert status == 200, served
        assert served == replayed, (member_id, served, replayed)
    return expected


async def assert_chain_verifies(client: Client) -> dict:
    status, report, _ = await client.get("/v1/audit/verify")
    assert status == 200, report
    assert report["ok"] and report["first_bad_position"] is None, report
    return report


# -- a database that can be cut off --------------------------------------------------


class FaultyProxy:
    """A TCP proxy in front of PostgreSQL that a test can cut, close or black-hole.

    The service is given ``proxied_url`` instead of the real URL. ``cut()`` drops
    every open connection (as a server restart does); ``refuse()`` also closes the
    port (connection refused: the database is down); ``blackhole()`` accepts and
    forwards nothing (a network partition: the worst case for timeouts);
    ``heal()`` goes back to forwarding. ``latency_s`` delays every chunk
    forwarded (a far-away client). Works with a TCP or a Unix-socket server.
    """

    def __init__(self, database_url: str) -> None:
        from urllib.parse import parse_qs, urlsplit, urlunsplit

        self.database_url = database_url
        parts = urlsplit(database_url)
        socket_dir = parse_qs(parts.query).get("host", [None])[0] or (parts.hostname if (parts.hostname or "").startswith("/") else None)
        self.target_port = parts.port or 5432
        self.target_socket = f"{socket_dir}/.s.PGSQL.{self.target_port}" if socket_dir else None
        self.target_host = parts.hostname or "127.0.0.1"
        self.port = free_port()
        userinfo = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
        self.proxied_url = urlunsplit(parts._replace(netloc=f"{userinfo}127.0.0.1:{self.port}", query=""))
        self.mode = "forward"
        self.latency_s = 0.0
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> "FaultyProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.mode = "forward"
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.mode == "blackhole":
            return  # held open, never answered
        try:
            if self.target_socket:
                up_reader, up_writer = await asyncio.open_unix_connection(self.target_socket)
            else:
                up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                if self.mode == "blackhole":
                    continue  # swallowed
                if self.latency_s:
                    await asyncio.sleep(self.latency_s)
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            sink.close()

    def cut(self) -> None:
        """Drop every open connection (both sides)."""
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def refuse(self) -> None:
        """The database is down: open connections dropped, new ones refused."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.cut()

    def blackhole(self) -> None:
        """Connections stay open and new ones are accepted, but nothing gets through."""
        self.mode = "blackhole"

    async def heal(self) -> None:
        self.cut()  # black-holed connections are useless: drop them as a network recovery would
        self.mode = "forward"
        if self._server is None:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def close(self) -> None:
        await self.refuse()
        for task in list(self._tasks):
            task.cancel()


async def terminate_backends(database_url: str, application_name: str | None = None) -> int:
    """pg_terminate_backend on the database's connections but our own (or those of one application)."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(
            """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
               WHERE datname = current_database() AND pid <> pg_backend_pid()
                 AND ($1::text IS NULL OR application_name = $1)""",
            application_name,
        )
    finally:
        await conn.close()


# -- the command line and the projections ---------------------------------------------


def run_cli(database_url: str, *args: str, timeout_s: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``loyalty <args>`` on ``database_url`` (as `python -m service`), output captured."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")}
    environment.update({"DATABASE_URL": database_url, **(env or {})})
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=timeout_s)


async def wait_for_projections(client: Client, timeout_s: float = 60) -> list[dict]:
    """Until every projection has applied the whole log (GET /v1/projections), or AssertionError."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body, _ = await client.get("/v1/projections")
        assert status == 200, body
        listed = body["projections"]
        if all(p["lag_events"] == 0 and p["state"] == "live" for p in listed):
            return listed
        assert time.monotonic() < deadline, f"projections did not catch up: {listed}"
        await asyncio.sleep(0.1)
