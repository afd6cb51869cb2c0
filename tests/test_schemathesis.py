"""Hostile input, generated: schemathesis reads /openapi.json from the live service and attacks every operation.

Valid and invalid requests (wrong types, missing fields, huge numbers, odd
strings, bad ids, unknown methods) go to the real service over a real socket,
through every phase: the coverage phase's boundary values, fuzzing, and
stateful sequences that follow the document's links. Every answer must be
something other than a 5xx, must be a status the document lists with its
content type and schema, invalid requests must be refused, and authentication
must not be ignored. Bounded: `--max-time`, the whole run well under 90 s.

Left out on purpose: `positive_data_acceptance` (a schema-valid request may
still break a business rule: a return larger than its purchase, a coupon past
its date, an `occurred_at` in the future; those are 4xx by the contract) and
`use_after_free`/`ensure_resource_availability` (no DELETE exists).

When run with SCHEMATHESIS_HOOKS=tests.test_schemathesis this module is the
hooks module of the schemathesis process (see the bottom).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ledger.database import run_blocking
from tests.service_process import ROOT, ServiceProcess

MAX_TIME_S = 30
CHECKS_LEFT_OUT = ["positive_data_acceptance", "use_after_free", "ensure_resource_availability"]


@pytest.fixture
def live_service(database_url):
    service = ServiceProcess(database_url)
    run_blocking(service.start)
    try:
        yield service
    finally:
        service.close()


def test_generated_requests_to_every_operation_get_no_5xx_and_answers_as_documented(live_service, tmp_path):
    started = time.monotonic()
    config = tmp_path / "schemathesis.toml"
    # The document allows long polls of 30 s and projection waits up to 2^62; the fuzzer
    # gets a taste of each (their bounds have tests of their own in test_hostile_input.py).
    config.write_text('[parameters]\n"query.wait_ms" = 20\n"query.min_position" = 0\n')
    command = [
        str(Path(sys.executable).parent / "st"), "--config-file", str(config), "run", f"{live_service.url}/openapi.json",
        "--header", f"Authorization: Bearer {live_service.admin_key}",
        "--checks", "all", "--exclude-checks", ",".join(CHECKS_LEFT_OUT),
        "--max-time", str(MAX_TIME_S), "--max-examples", "20", "--request-timeout", "15",
        "--seed", "7", "--generation-database", "none", "--no-color",
        "--report", "junit", "--report-dir", str(tmp_path),
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.test_schemathesis", "PYTHONPATH": str(ROOT),
           "SCHEMATHESIS_TELEMETRY": "false"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=MAX_TIME_S + 60)
    output = result.stdout + result.stderr
    print(output[-3000:])
    assert result.returncode == 0, output[-20000:]
    log = live_service.output()  # a 500 is logged as "unexpected failure", with its traceback
    assert "unexpected failure" not in log, log[log.index("unexpected failure") - 200:][:6000]
    assert time.monotonic() - started < 90


# -- hooks, loaded by the schemathesis process only ------------------------------------

if os.environ.get("SCHEMATHESIS_HOOKS") == __name__:
    import schemathesis

    # The batch body is NDJSON text; schemathesis sends generated strings as they are.
    schemathesis.serializer.alias("application/x-ndjson", "text/plain")
