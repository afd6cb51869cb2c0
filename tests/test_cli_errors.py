"""A user's mistake on the command line ends in one line saying what is wrong and what to do, and exit 2.

Never a traceback: the commands run as the user runs them (``python -m
service``, a real database), and each mistake's stderr is read as they read it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cli.commands import build_parser
from tests.service_process import ROOT, run_cli

EXIT_USAGE = 2
# Each command spends ~1 s starting Python; a few at once keep this module's run short.
CONCURRENT_COMMANDS_MAX = 4

WINDOW = ["--from", "2025-01-01T00:00:00Z", "--to", "2025-02-01T00:00:00Z"]

# name: (arguments, environment variables, words its one line of refusal holds); {dir} is the files' directory.
MISTAKES = {
    "import of a missing file": (
        ["import", "{dir}/missing.ndjson"], {},
        ["loyalty import:", "cannot read {dir}/missing.ndjson", "No such file", "give the path of a readable file"]),
    "import of a directory": (
        ["import", "{dir}"], {},
        ["loyalty import:", "cannot read {dir}", "Is a directory"]),
    "programme set of malformed TOML": (
        ["programme", "set", "{dir}/malformed.toml"], {},
        ["loyalty programme:", "{dir}/malformed.toml is not valid TOML", "line 1", "correct the file"]),
    "programme set of a missing file": (
        ["programme", "set", "{dir}/missing.toml"], {},
        ["loyalty programme:", "cannot read {dir}/missing.toml"]),
    "a LOYALTY_PROGRAMME with an unknown setting": (
        ["verify"], {"LOYALTY_PROGRAMME": "{dir}/unknown_setting.toml"},
        ["loyalty verify:", "LOYALTY_PROGRAMME={dir}/unknown_setting.toml is not a valid programme",
         "unknown field `earn_rate_typo`", "unset LOYALTY_PROGRAMME"]),
    "a LOYALTY_PROGRAMME that is missing": (
        ["export"], {"LOYALTY_PROGRAMME": "{dir}/missing.toml"},
        ["loyalty export:", "LOYALTY_PROGRAMME={dir}/missing.toml cannot be read", "No such file"]),
    "simulate of changes that are not JSON": (
        ["simulate", *WINDOW, "{dir}/not.json"], {},
        ["loyalty simulate:", "{dir}/not.json is not valid JSON", "correct the file"]),
    "simulate of a missing changes file": (
        ["simulate", *WINDOW, "{dir}/missing.json"], {},
        ["loyalty simulate:", "cannot read {dir}/missing.json"]),
    "export to a directory that does not exist": (
        ["export", "--out", "{dir}/missing/log.jsonl"], {},
        ["loyalty export:", "cannot write {dir}/missing/log.jsonl", "No such file", "give a writable path"]),
    "export after a negative position": (
        ["export", "--after", "-5"], {},
        ["loyalty export: error: argument --after:", "'-5' is not a position"]),
    "serve with a LOYALTY_PROGRAMME with an unknown setting": (  # refused before it opens a port or the database
        ["serve"], {"LOYALTY_PROGRAMME": "{dir}/unknown_setting.toml"},
        ["loyalty serve:", "is not a valid programme", "unset LOYALTY_PROGRAMME"]),
    "a DATABASE_URL where nothing answers": (  # its password is not shown
        ["verify"], {"DATABASE_URL": "postgresql://root:secret@127.0.0.1:1/ledger"},
        ["loyalty verify:", "cannot connect to the database at postgresql://root:***@127.0.0.1:1/ledger",
         "unset DATABASE_URL"]),
    "a DATABASE_URL that is no URL": (
        ["verify"], {"DATABASE_URL": "notaurl"},
        ["loyalty verify:", "cannot connect to the database at notaurl", "invalid DSN"]),
    "replay as of a time out of range": (
        ["replay", "--as-of", "9999-12-31T23:59:59Z"], {},
        ["loyalty replay: error: argument --as-of:", "'9999-12-31T23:59:59Z' is out of range"]),
}


def write_mistaken_files(directory: Path) -> None:
    (directory / "malformed.toml").write_text("earn_rate =\n")
    (directory / "unknown_setting.toml").write_text("earn_rate_typo = 2\n")
    (directory / "not.json").write_text("{settings: nope}\n")


@pytest.fixture(scope="module")
def files_directory(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cli-errors")
    write_mistaken_files(directory)
    return directory


@pytest.fixture(scope="module")
def finished(module_database_url, files_directory) -> dict[str, subprocess.CompletedProcess]:
    """Every mistake's command, run side by side; none of them may write to the database."""
    def run(name: str) -> subprocess.CompletedProcess:
        arguments, variables, _words = MISTAKES[name]
        return run_cli(module_database_url, *[a.format(dir=files_directory) for a in arguments],
                       env={k: v.format(dir=files_directory) for k, v in variables.items()}, timeout_s=60)

    with ThreadPoolExecutor(CONCURRENT_COMMANDS_MAX) as pool:
        return dict(zip(MISTAKES, pool.map(run, MISTAKES)))


@pytest.mark.parametrize("name", MISTAKES)
def test_a_mistake_ends_in_one_line_saying_what_is_wrong_and_exit_2(name, finished, files_directory):
    process = finished[name]
    assert process.returncode == EXIT_USAGE, process.stderr
    assert "Traceback" not in process.stderr, process.stderr
    # The refusal is the one line that starts with the program's name (argparse adds its usage line).
    said = [line for line in process.stderr.splitlines() if line.startswith("loyalty ")]
    assert len(said) == 1, process.stderr
    for word in MISTAKES[name][2]:
        assert word.format(dir=files_directory) in said[0]


TIME_OPTIONS = [
    ["replay", "--as-of", "{t}"],
    ["programme", "show", "--as-of", "{t}"],
    ["programme", "set", "changes.toml", "--effective-from", "{t}"],
    ["simulate", "--from", "{t}", "--to", "2025-02-01T00:00:00Z", "changes.json"],
    ["simulate", "--from", "2025-01-01T00:00:00Z", "--to", "{t}", "changes.json"],
]


@pytest.mark.parametrize("arguments", TIME_OPTIONS, ids=lambda arguments: " ".join(arguments))
@pytest.mark.parametrize("moment, why", [
    ("9999-12-31T23:59:59Z", "out of range"),
    ("0999-12-31T23:59:59Z", "out of range"),
    ("9999-12-31T23:59:59-01:00", "out of range"),  # past what datetime holds once in UTC
    ("2025-01-31T00:00:00", "not an RFC 3339 time with an offset"),
    ("yesterday", "not an RFC 3339 time with an offset"),
])
def test_every_time_option_refuses_a_time_it_cannot_use(arguments, moment, why, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([a.format(t=moment) for a in arguments])
    assert exit_.value.code == EXIT_USAGE
    assert why in capsys.readouterr().err


def test_export_to_a_reader_that_has_gone_ends_quietly(module_database_url):
    """``loyalty export | head -1``: the reader closing the pipe cuts the output short, as for any Unix tool."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LOYALTY_")}
    environment["DATABASE_URL"] = module_database_url
    process = subprocess.Popen([sys.executable, "-m", "service", "export", "--format", "csv"], cwd=ROOT,
                               env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # gone before the CSV header comes
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 128 + signal.SIGPIPE, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
