"""What the console needs of the service, without a browser (tests/test_console.py has the browser's).

- ``GET /v1/api-keys/me`` names the calling key's role, for every role.
- ``/console`` and every page below it serve one shell with no key; its files are the package's
  own, with a Content-Security-Policy that lets the page reach nothing but this service.
- ``GET /v1/audit/verify`` with ``Accept: application/x-ndjson`` streams progress, then the report.
- The files ship as package data: a build of the package holds every one of them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from api import reads
from api.console import ASSETS, SHELL
from tests.service_process import ROOT

STATIC = ROOT / "api" / "console" / "static"


async def test_the_current_key_is_named_with_its_role_for_every_role(api):
    for role in ("checkout", "reader", "auditor", "admin"):
        status, body, _ = await api.get("/v1/api-keys/me", role=role)
        assert status == 200 and body["role"] == role and body["name"] == f"test-{role}", body
        assert set(body) == {"key_id", "name", "role"}, "never the key itself"
    response = await api.client.get("/v1/api-keys/me")
    assert response.status == 401


async def test_every_console_page_is_the_shell_served_without_a_key(api):
    shell = (STATIC / SHELL).read_bytes()
    for path in ("/console", "/console/", "/console/liability", "/console/members/m-1", "/console/members/m-1/",
                 "/console/verify", "/console/foo/bar", "/console/members/m-1/extra", "/console/assets/a/b"):
        response = await api.client.get(path)
        assert response.status == 200 and await response.read() == shell, path
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    assert b"http://" not in shell and b"https://" not in shell, "the shell loads nothing from elsewhere"


async def test_the_console_files_are_served_by_name_and_revalidated(api):
    for name, content_type in (("app.js", "text/javascript"), ("console.css", "text/css"),
                               ("chart.umd.min.js", "text/javascript")):
        response = await api.client.get(f"/console/assets/{name}")
        assert response.status == 200 and response.headers["Content-Type"].startswith(content_type), name
        again = await api.client.get(f"/console/assets/{name}", headers={"If-None-Match": response.headers["ETag"]})
        assert again.status == 304
    for missing in ("nope.js", "..%2Fservice.py", "vendor%2Fchart.umd.min.js"):
        response = await api.client.get(f"/console/assets/{missing}")
        assert response.status == 404 and (await response.json())["code"] == "not_found", missing


async def test_verification_streams_its_progress_then_the_report(api, monkeypatch):
    for n in range(30):
        await api.enrol(f"m{n}")
    monkeypatch.setattr(reads, "VERIFY_PROGRESS_EVERY_S", 0.0005)  # a line at every turn of the loop
    response = await api.client.get("/v1/audit/verify", headers={**api.headers("auditor"),
                                                                  "Accept": "application/x-ndjson"})
    assert response.status == 200 and response.headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in (await response.text()).splitlines()]
    status, report, _ = await api.get("/v1/audit/verify", role="auditor")
    assert status == 200 and lines[-1] == report and report["ok"]
    progress = lines[:-1]
    assert progress, "no progress line"
    assert all(set(p) == {"checked", "head_position"} and p["head_position"] == report["head_position"]
               for p in progress)
    assert [p["checked"] for p in progress] == sorted(p["checked"] for p in progress)
    assert progress[-1]["checked"] <= report["checked"]


def test_the_console_files_are_package_data(tmp_path):
    """setuptools' build of the package (what a wheel holds) has every file the console serves."""
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".loyalty", "build", "*.egg-info", "__pycache__", "tests", "docs", "bench"))
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py",
                    "--build-lib", str(tmp_path / "lib")], cwd=source, check=True, capture_output=True)
    built = tmp_path / "lib" / "api" / "console" / "static"
    shipped = {path.name for path in built.rglob("*") if path.is_file()}
    assert shipped >= set(ASSETS), set(ASSETS) - shipped
    assert (built / "vendor" / "chart.js-LICENSE.md").exists(), "the chart library's licence ships with it"
