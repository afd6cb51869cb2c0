"""Settings come from the environment once, at start, and a value that cannot work stops the start."""

from __future__ import annotations

import pytest

from ledger.settings import Settings, SettingsError
from tests.service_process import run_cli

UNREACHABLE = "postgresql://nobody@127.0.0.1:9/none"  # never reached: the settings are refused first


def test_every_setting_is_read_from_its_variable():
    settings = Settings.from_env({
        "DATABASE_URL": "postgresql://db/loyalty", "LOYALTY_PROGRAMME": "p.toml", "LOYALTY_HOST": "0.0.0.0",
        "LOYALTY_PORT": "9090", "LOYALTY_RATE_LIMIT": "50", "LOYALTY_SCHEDULER": "off", "LOYALTY_PROJECTORS": "OFF",
        "LOYALTY_ADMIN_KEY": "secret", "LOYALTY_REQUEST_DEADLINE_S": "2.5", "LOYALTY_KEEPALIVE_S": "30",
        "LOYALTY_CACHE_EVENTS": "1000", "LOYALTY_IDEMPOTENCY_DAYS": "3", "LOYALTY_LOG_LEVEL": "debug",
        "LOYALTY_NATS_URL": "nats://127.0.0.1:4222", "LOYALTY_PUBLISHER": "off",
    })
    assert settings == Settings(
        database_url="postgresql://db/loyalty", programme_path="p.toml", host="0.0.0.0", port=9090,
        rate_limit_per_s=50.0, rate_burst=100.0, scheduler=False, projectors=False, admin_key="secret",
        request_deadline_s=2.5, keepalive_s=30.0, cache_events_max=1000, idempotency_days=3, log_level="DEBUG",
        nats_url="nats://127.0.0.1:4222", publisher=False,
    )
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({"LOYALTY_RATE_LIMIT": "off"}).rate_limit_per_s is None


@pytest.mark.parametrize("name, value", [
    ("LOYALTY_RATE_LIMIT", "0"), ("LOYALTY_RATE_LIMIT", "-5"), ("LOYALTY_RATE_LIMIT", "fast"),
    ("LOYALTY_RATE_LIMIT", "nan"), ("LOYALTY_PORT", "0"), ("LOYALTY_PORT", "80a"), ("LOYALTY_SCHEDULER", "no"),
    ("LOYALTY_PROJECTORS", "maybe"), ("LOYALTY_REQUEST_DEADLINE_S", "0"), ("LOYALTY_KEEPALIVE_S", "-1"),
    ("LOYALTY_CACHE_EVENTS", "0"), ("LOYALTY_IDEMPOTENCY_DAYS", "0"), ("LOYALTY_IDEMPOTENCY_DAYS", "a week"),
    ("LOYALTY_LOG_LEVEL", "LOUD"), ("LOYALTY_PUBLISHER", "maybe"),
])
def test_a_setting_that_cannot_work_is_refused_naming_its_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


@pytest.mark.parametrize("command", [["serve"], ["verify"]])
def test_a_rate_limit_of_zero_stops_the_start_with_a_clear_message_and_exit_2(command):
    finished = run_cli(UNREACHABLE, *command, env={"LOYALTY_RATE_LIMIT": "0"}, timeout_s=60)
    assert finished.returncode == 2, finished
    assert "LOYALTY_RATE_LIMIT='0'" in finished.stderr and "greater than 0" in finished.stderr
