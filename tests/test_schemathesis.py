"""Hostile input, generated: schemathesis reads /openapi.json from the live service and attacks every operation.

Valid and invalid requests (wrong types, missing fields, huge numbers, odd
strings, bad ids, unknown methods) go to the real service over a real socket,
through every phase: the coverage phase's boundary values, fuzzing, and
stateful sequences that follow the document's links. Every answer must be
something other than a 5xx (but the contract's 503 ``projection_lagging`` to
a free ``min_position``), must be a status the document lists with its
content type and schema (every success answer has a msgspec type), invalid requests must be refused, and authentication
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

from tests.service_process import ROOT

MAX_TIME_S = 30
# not_a_server_error gives way to no_5xx_but_a_projection_lagging (below): the same check, except
# for the contract's own 503 to a min_position the projection has not reached.
CHECKS_LEFT_OUT = ["positive_data_acceptance", "use_after_free", "ensure_resource_availability", "not_a_server_error"]


def test_generated_requests_to_every_operation_get_no_5xx_and_answers_as_documented(live_service, tmp_path):
    started = time.monotonic()
    config = tmp_path / "schemathesis.toml"
    # The document allows long polls of 30 s: the fuzzer gets a taste (the bound has a test of its
    # own in test_hostile_input.py). min_position is free: a position not reached yet waits 2 s,
    # then answers the documented 503 projection_lagging.
    config.write_text('[parameters]\n"query.wait_ms" = 20\n')
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

    @schemathesis.check
    def no_5xx_but_a_projection_lagging(ctx, response, case) -> None:
        """No 5xx, except 503 ``projection_lagging`` with Retry-After to a read given a ``min_position``.

        That 503 is CONTRACT §4's answer to a position the projection has not applied within the wait,
        and a generated min_position is mostly one the log never reached.
        """
        if response.status_code < 500:
            return
        lagging = (response.status_code == 503 and "min_position" in (case.query or {})
                   and "retry-after" in {name.lower() for name in response.headers}
                   and response.json().get("code") == "projection_lagging")
        if not lagging:
            raise AssertionError(f"server error {response.status_code}: {response.text[:500]}")
