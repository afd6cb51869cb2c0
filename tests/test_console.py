"""The console (CONTRACT §8) in a real browser, against the real service.

Headless Chromium, Debian's package (`make test` installs it when missing and
it runs as root; Playwright's own browser downloads cannot reach closed
networks), driven by Python Playwright. One service process
(tests/service_process.py) and one browser serve the whole module; each test
opens a fresh browser context, in which every request is intercepted and its
host recorded. The figures the page shows are compared with the API's own
answers, read here with the same keys.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import pytest

from ledger.database import run_blocking
from tests.service_process import ROOT, Client, FaultyProxy, ServiceProcess, free_port
from tests.service_process import wait_for_projections as projections_caught_up

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "docs" / "console"
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 15_000
MANY_LINES = 520  # more than one page of the console's ledger reads (500 a page)

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - the test extras install it
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="the browser tests need the Python package playwright "
                       "(pip install -e '.[test]')"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"the browser tests need Debian's chromium at {CHROMIUM}: "
                       "`make test` installs it when run as root with apt-get; elsewhere `apt-get install chromium`"),
]


# -- the API, read directly (the figures the page must show) -------------------------------


def call(service: ServiceProcess, key: str, method: str, path: str, body: bytes | None = None,
         content_type: str = "application/json", **query) -> tuple[int, object]:
    url = f"{service.url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as refused:
        status, raw = refused.code, refused.read()
    text = raw.decode()
    if content_type == "application/x-ndjson":
        return status, [json.loads(line) for line in text.splitlines() if line]
    return status, json.loads(text)


def read(service: ServiceProcess, key: str, path: str, **query) -> dict:
    status, body = call(service, key, "GET", path, **query)
    assert status == 200, (path, body)
    return body


def write(service: ServiceProcess, key: str, path: str, body: dict, **query) -> dict:
    status, answer = call(service, key, "POST", path, json.dumps(body).encode(), **query)
    assert status in (200, 201), (path, answer)
    return answer


def read_all(service: ServiceProcess, key: str, path: str, listed: str) -> list[dict]:
    """Every item of a paged read (`after`, `next_after`)."""
    items, after = [], None
    while True:
        page = read(service, key, path, limit=1000, **({"after": after} if after else {}))
        items += page[listed]
        after = page["next_after"]
        if after is None:
            return items


def every_line(service: ServiceProcess, key: str, member_id: str) -> list[dict]:
    return read_all(service, key, f"/v1/members/{member_id}/ledger", "lines")


def every_event(service: ServiceProcess, key: str, member_id: str) -> list[dict]:
    return read_all(service, key, f"/v1/members/{member_id}/events", "events")


def yuan(cents: int) -> str:
    return f"¥{cents // 100}.{cents % 100:02d}"


def stamp(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- fixtures ---------------------------------------------------------------------------


class DatabaseSwitch:
    """A FaultyProxy in front of the module's database, run on a loop of its own thread (the tests are
    synchronous, as Playwright's sync API needs), so that a test can take the database down."""

    def __init__(self, database_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = self._run(FaultyProxy(database_url).start())

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(30)

    def down(self) -> None:
        self._run(self.proxy.refuse())

    def up(self) -> None:
        self._run(self.proxy.heal())

    def close(self) -> None:
        self._run(self.proxy.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture(scope="module")
def database(module_database_url):
    switch = DatabaseSwitch(module_database_url)
    yield switch
    switch.close()


@pytest.fixture(scope="module")
def service(database, tmp_path_factory):
    """The real service, through the switch, on a programme that lets the seed go 420 days back."""
    programme = tmp_path_factory.mktemp("console") / "programme.toml"
    programme.write_text("max_backdate_days = 1000\n")
    process = ServiceProcess(database.proxy.proxied_url, env={"LOYALTY_PROGRAMME": str(programme)})
    run_blocking(process.start)
    yield process
    process.close()


@pytest.fixture(scope="module")
def seeded(service):
    """Keys of each role, a member with a year of history, one with more ledger lines than a page.

    Dates count back from the start of today (UTC), and the screenshots show the pages as of then,
    so a run on the same day writes the same images (no churn in docs/ from one run to the next)."""
    admin = service.admin_key
    keys = {role: write(service, admin, "/v1/api-keys", {"name": f"console-{role}", "role": role})["key"]
            for role in ("reader", "auditor", "checkout")}
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    ago = lambda days: stamp(today - timedelta(days=days))  # noqa: E731
    member = "m-ada"
    write(service, admin, "/v1/members", {"member_id": member, "enrolled_at": ago(420), "identities": [
        {"type": "phone", "value": "+8613800000001"}, {"type": "card", "value": "C-1001"}]})
    base = f"/v1/members/{member}"
    write(service, admin, f"{base}/coupons/welcome-1/redemption",
          {"order_ref": "o-1", "order_amount_cents": 150_00, "occurred_at": ago(410)})
    for purchase_id, amount_cents, days in (("p0", 880_00, 400), ("p1", 1258_00, 100), ("p2", 2516_00, 70),
                                            ("p3", 399_00, 40), ("p4", 1999_00, 10)):
        write(service, admin, f"{base}/purchases", {"purchase_id": purchase_id, "store_id": "s-001",
                                                    "amount_cents": amount_cents, "occurred_at": ago(days)})
    write(service, admin, f"{base}/returns",
          {"return_id": "r1", "purchase_id": "p1", "amount_cents": 500_00, "occurred_at": ago(60)})
    write(service, admin, f"{base}/redemptions", {"redemption_id": "x1", "points": 100, "order_ref": "o-9",
                                                  "occurred_at": ago(30)})
    write(service, admin, f"{base}/adjustments", {"adjustment_id": "a1", "points": 50, "reason": "goodwill",
                                                  "note": "late delivery", "occurred_at": ago(20)})
    write(service, admin, "/v1/jobs/expire", {})  # p0's points expired 35 days ago: the trail says so
    many = "m-many"
    batch = [{"op": "enrol", "member_id": many, "body": {"member_id": many, "identities": [],
                                                         "enrolled_at": ago(2)}}] + [
        {"op": "purchase", "member_id": many, "body": {"purchase_id": f"q{n}", "store_id": "s-002",
                                                        "amount_cents": 10_00, "occurred_at": ago(1)}}
        for n in range(MANY_LINES)]
    status, results = call(service, admin, "POST", "/v1/batch", "\n".join(json.dumps(l) for l in batch).encode(),
                           content_type="application/x-ndjson")
    assert status == 200 and all(r["status"] == 201 for r in results), results[:3]
    seed_a_campaign(service, admin)
    wait_for_projections(service, admin)
    return {"keys": keys, "admin": admin, "member": member, "many": many, "as_of": ago(50), "today": ago(0)}


def seed_a_campaign(service: ServiceProcess, admin: str) -> None:
    """A campaign with a budget and a condition in cents, part of it granted, when the server offers
    campaigns (§6.2)."""
    now = datetime.now(timezone.utc)
    campaign = {"campaign_id": "dbl", "name": "Double points", "starts_at": stamp(now - timedelta(minutes=1)),
                "ends_at": stamp(now + timedelta(days=30)), "reward": {"kind": "multiplier", "multiplier_pct": 200},
                "budget_points": 1000, "conditions": {"min_amount_cents": 200_00}}
    status, answer = call(service, admin, "POST", "/v1/campaigns", json.dumps(campaign).encode())
    if status == 404:  # not on this server: the page must say so (test_operations_pages_…)
        return
    assert status == 201, answer
    write(service, admin, "/v1/members", {"member_id": "m-camp", "identities": []})
    write(service, admin, "/v1/members/m-camp/purchases", {"purchase_id": "c1", "store_id": "s-001",
                                                            "amount_cents": 300_00})


def wait_for_recovery(service: ServiceProcess, key: str) -> None:
    """Until the service answers a database read again after an outage: it recovers by itself."""
    deadline = time.monotonic() + 30
    while call(service, key, "GET", "/v1/programme/liability")[0] != 200:
        assert time.monotonic() < deadline, "the service did not recover from the outage"
        time.sleep(0.1)


def wait_for_projections(service: ServiceProcess, key: str) -> None:
    async def wait() -> None:
        async with aiohttp.ClientSession() as session:
            await projections_caught_up(Client(session, service.url, key))

    run_blocking(wait)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield launched
        launched.close()


class Recorded:
    """Every request the page made; any to another host is refused and remembered."""

    def __init__(self, service: ServiceProcess) -> None:
        self.allowed = urllib.parse.urlsplit(service.url).netloc
        self.urls: list[str] = []
        self.foreign: list[str] = []

    def route(self, route) -> None:
        url = route.request.url
        self.urls.append(url)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "data":
            route.continue_()
        elif parts.scheme != "http" or parts.netloc != self.allowed:
            self.foreign.append(url)
            route.abort()
        else:
            route.continue_()


@pytest.fixture
def recorded(service):
    return Recorded(service)


@pytest.fixture
def context(browser, recorded):
    context = browser.new_context(viewport=LAPTOP)
    context.route("**/*", recorded.route)
    context.set_default_timeout(WAIT_MS)
    yield context
    context.close()


@pytest.fixture
def page(context) -> "Page":
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    assert errors == [], errors  # no script error on any page


def sign_in(page: "Page", service: ServiceProcess, key: str, path: str = "/console") -> None:
    page.goto(service.url + path)
    page.fill("input[name=key]", key)
    page.click("form button[type=submit]")
    page.wait_for_selector("#who:not([hidden])")


def shown(page: "Page", field: str) -> str:
    return page.locator(f"[data-field='{field}']").first.inner_text().strip()


# -- the tests ---------------------------------------------------------------------------


def test_signing_in_shows_the_keys_role_and_what_it_may_read(page, service, seeded):
    sign_in(page, service, seeded["keys"]["reader"])
    assert shown(page, "role") == "reader"
    readable = page.locator("[data-read=yes]").all_inner_texts()
    refused = page.locator("[data-read=no]").all_inner_texts()
    assert any("/v1/programme/liability" in r for r in readable)
    assert any("/v1/audit/verify" in r for r in refused), "a reader may not verify the chain"


def test_a_wrong_key_shows_the_refusal_and_is_not_kept(page, service, seeded):
    page.goto(service.url + "/console")
    page.fill("input[name=key]", "lk_not_a_key_of_this_service")
    page.click("form button[type=submit]")
    refusal = page.locator(".refusal[data-status='401']")
    refusal.wait_for()
    assert "401" in refusal.inner_text()
    assert page.evaluate("sessionStorage.length") == 0
    assert page.locator("input[name=key]").is_visible(), "the form stays for another try"


def test_a_members_figures_equal_the_apis_now_and_as_of(page, service, seeded):
    member, key = seeded["member"], seeded["keys"]["reader"]
    sign_in(page, service, key, f"/console/members/{member}")
    seen = {}
    for as_of in (None, seeded["as_of"]):
        if as_of:
            page.goto(f"{service.url}/console/members/{member}?as_of={urllib.parse.quote(as_of)}")
        page.locator("[data-field=available]").wait_for()
        query = {"as_of": as_of} if as_of else {}
        balance = read(service, key, f"/v1/members/{member}/balance", **query)
        tier = read(service, key, f"/v1/members/{member}/tier", **query)
        seen[as_of] = {field: shown(page, field) for field in ("available", "pending", "debt", "tier", "growth_window")}
        assert seen[as_of] == {"available": str(balance["available"]), "pending": str(balance["pending"]),
                               "debt": str(balance["debt"]), "tier": tier["tier"],
                               "growth_window": str(tier["growth_window"])}, as_of
    assert seen[None] != seen[seeded["as_of"]], "the seed's past differs from its present"


def test_the_ledger_shows_one_row_per_line_with_the_event_behind_it(page, service, seeded):
    sign_in(page, service, seeded["keys"]["auditor"], f"/console/members/{seeded['member']}?as_of={seeded['today']}")
    lines = every_line(service, seeded["admin"], seeded["member"])
    rows = page.locator("[data-row=ledger]")
    rows.first.wait_for()
    assert rows.count() == len(lines)
    assert {line["kind"] for line in lines} >= {"earn", "clawback", "redeem", "adjust", "expire"}
    for row, line in zip(rows.all(), lines):
        cells = row.locator("td").all_inner_texts()
        assert [cells[0], cells[3], cells[4]] == [str(line["line"]), str(line["points"]), str(line["running_balance"])]
        assert row.locator("a").get_attribute("href") == f"#event-{line['position']}"
    page.locator(f"#event-{lines[0]['position']}").wait_for()  # the event behind the first line, with its hash
    # Down to the raw events: their recorded_at is the run's own time.
    events_at = page.locator("h2", has_text="Events").bounding_box()["y"]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / "member.png", full_page=True,
                    clip={"x": 0, "y": 0, "width": LAPTOP["width"], "height": events_at})


def test_a_table_wider_than_the_page_says_it_scrolls_sideways_and_one_that_fits_does_not(page, service, seeded):
    sign_in(page, service, seeded["keys"]["auditor"], f"/console/members/{seeded['member']}")
    page.locator("body[data-ready]").wait_for()
    boxes = {row: page.locator(".scroll", has=page.locator(f"[data-row={row}]")) for row in ("event", "ledger")}
    overflows = {row: box.evaluate("box => box.scrollWidth > box.clientWidth") for row, box in boxes.items()}
    assert overflows == {"event": True, "ledger": False}, "at a laptop's width the hashes and data do not fit"
    notes = {row: box.locator(".scroll-note") for row, box in boxes.items()}
    assert {row: note.is_visible() for row, note in notes.items()} == overflows
    assert notes["event"].inner_text() == "Scroll sideways for more columns"
    left = notes["event"].bounding_box()["x"]
    boxes["event"].evaluate("box => box.scrollLeft = box.scrollWidth")
    assert notes["event"].bounding_box()["x"] == left, "the note stays in view as the table scrolls"


def test_the_whole_trail_is_read_page_after_page(page, service, seeded):
    sign_in(page, service, seeded["keys"]["reader"], f"/console/members/{seeded['many']}")
    page.locator("[data-row=ledger]").first.wait_for()
    assert page.locator("[data-row=ledger]").count() == len(every_line(service, seeded["admin"], seeded["many"]))
    assert page.locator("[data-row=ledger]").count() == MANY_LINES
    # A reader may not read the raw events: the page says so and shows the rest.
    assert page.locator(".refusal[data-status='403']").count() == 1


def test_an_as_of_the_api_refuses_greys_no_line_and_says_nothing_of_greying(page, service, seeded):
    member, key = seeded["member"], seeded["keys"]["reader"]
    sign_in(page, service, key, f"/console/members/{member}?as_of=yesterday")
    page.locator("body[data-ready]").wait_for()
    assert page.locator(".refusal[data-status='422']").count() == 1, "the API's refusal of the time is shown"
    assert page.locator("[data-row=ledger]").count() == len(every_line(service, key, member))
    assert page.locator("tr.later").count() == 0 and "greyed" not in page.locator("#page").inner_text()
    # A time the API accepts greys the lines dated after it, and says so.
    page.goto(f"{service.url}/console/members/{member}?as_of={seeded['as_of']}")
    page.locator("body[data-ready]").wait_for()
    later = [line for line in every_line(service, key, member) if line["occurred_at"] > seeded["as_of"]]
    assert page.locator("tr.later").count() == len(later) > 0
    assert "are greyed" in page.locator("#page").inner_text()


def test_big_streams_load_further_lines_and_events_on_demand(context, service, seeded):
    context.add_init_script("window.consolePagesAtOnce = 1")  # one page of 500 at once, not 40
    page = context.new_page()
    member, key = seeded["many"], seeded["keys"]["auditor"]
    sign_in(page, service, key, f"/console/members/{member}")
    page.locator("body[data-ready]").wait_for()
    lines, events = every_line(service, key, member), every_event(service, key, member)
    assert len(lines) == MANY_LINES and len(events) > 500
    assert page.locator("[data-count=lines]").inner_text() == "500 lines so far; load further lines below."
    page.get_by_role("button", name="Load further lines").click()
    page.locator(f"[data-count=lines]:text-is('{len(lines)} lines.')").wait_for()
    assert page.locator("[data-row=ledger]").count() == len(lines)
    last_event = page.locator("[data-row=ledger] a").last.get_attribute("href")
    assert last_event == f"#event-{lines[-1]['position']}" and page.locator(last_event).count() == 0
    assert page.locator("[data-count=events]").inner_text() == "500 events so far; load further events below."
    for _ in range(len(events) // 500):  # a page of 500 a click
        page.get_by_role("button", name="Load further events").click()
    page.locator(f"[data-count=events]:text-is('{len(events)} events.')").wait_for()
    assert page.locator("[data-row=event]").count() == len(events)
    page.click(f"[data-row=ledger] a[href='{last_event}']")  # the last line's event is there now
    assert page.locator(f"{last_event}:target").count() == 1


def test_money_in_programme_settings_and_campaign_conditions_reads_as_yuan(page, service, seeded):
    key = seeded["keys"]["auditor"]
    sign_in(page, service, key, "/console/programme")
    page.locator("body[data-ready]").wait_for()
    settings = read(service, key, "/v1/programme")["settings"]
    text = page.locator("#page").inner_text()
    referral = settings["referral"]
    assert f"min_first_purchase_cents: {yuan(referral['min_first_purchase_cents'])}" in text
    assert f"value_cents: {yuan(settings['birthday_coupon']['value_cents'])}" in text  # nested objects too
    welcome = settings["welcome_pack"][0]  # and each item of a list, on a line of its own
    assert f"value_cents: {yuan(welcome['value_cents'])} · min_spend_cents: {yuan(welcome['min_spend_cents'])}" in text
    assert f"earn_cents_per_point: {yuan(settings['earn_cents_per_point'])} per point" in text
    assert "{" not in text and '"' not in text, "no raw JSON"
    status, campaigns = call(service, key, "GET", "/v1/campaigns")
    if status == 404:  # a server without campaigns: test_operations_pages_… checks its refusal
        return
    page.goto(service.url + "/console/campaigns")
    page.locator("body[data-ready]").wait_for()
    conditions = campaigns["campaigns"][0]["conditions"]
    assert page.locator("[data-row=campaign] [data-name=min_amount_cents]").inner_text() == \
        f"min_amount_cents: {yuan(conditions['min_amount_cents'])}"


def test_each_programme_version_shows_what_it_changed_against_the_one_before(page, recorded, service, seeded):
    """Read only when a row is opened, each version once; money in yuan, nested tables by their leaves, a list
    whole. The versions take effect next year, so the settings in force now, which other tests read, stay."""
    admin, key = seeded["admin"], seeded["keys"]["reader"]
    settings = read(service, key, "/v1/programme")["settings"]
    next_year = datetime.now(timezone.utc) + timedelta(days=365)
    rates = change_programme(service, admin, next_year, {
        "earn_cents_per_point": settings["earn_cents_per_point"] * 2,
        "member_day": {**settings["member_day"], "multiplier_pct": 300},
        "referral": {**settings["referral"], "referee_coupon": {**settings["referral"]["referee_coupon"],
                                                                "value_cents": 15_00}}})
    platinum = {"name": "platinum", "threshold": 9000, "multiplier_pct": 200}
    tiers = change_programme(service, admin, next_year + timedelta(days=1),
                             {"tiers": settings["tiers"] + [platinum]})
    sign_in(page, service, key, "/console/programme")
    page.locator("body[data-ready]").wait_for()
    assert page.locator("[data-row=programme-version]").first.locator("td").last.inner_text() == "the first version"
    as_of_reads = lambda: [url for url in recorded.urls if "/v1/programme?as_of=" in url]  # noqa: E731
    assert as_of_reads() == [], "no version is read before its row is opened"
    earn_cents, coupon_cents = settings["earn_cents_per_point"], settings["referral"]["referee_coupon"]["value_cents"]
    assert changes_shown(page, rates) == {
        "earn_cents_per_point": f"{yuan(earn_cents)} per point → {yuan(earn_cents * 2)} per point",
        "member_day.multiplier_pct": f"{settings['member_day']['multiplier_pct']} → 300",
        "referral.referee_coupon.value_cents": f"{yuan(coupon_cents)} → ¥15.00"}
    assert list(changes_shown(page, tiers)) == ["tiers"]
    was, now = (page.locator(f"[data-changes='{tiers}'] [data-change=tiers] .{when} li").all_inner_texts()
                for when in ("was", "now"))
    assert was == [" · ".join(f"{name}: {value}" for name, value in tier.items()) for tier in settings["tiers"]]
    assert now == was + ["name: platinum · threshold: 9000 · multiplier_pct: 200"], "the whole list, not its tail"
    assert len(as_of_reads()) == 3, "three versions read, the one both rows compare read once"
    # A version replaced from the same moment was never in force: no read shows its settings, and the rows say so.
    replacing = change_programme(service, admin, next_year + timedelta(days=1), {"pending_days": 3})
    page.reload()
    for version in (tiers, replacing):
        page.click(f"[data-changes='{version}'] summary")
        assert page.locator(f"[data-changes='{version}']").get_by_text("was never in force").inner_text() == \
            f"Version {tiers} was never in force (version {replacing} replaced it from the same moment), " \
            "so the API has no read of its settings to compare."


def change_programme(service: ServiceProcess, admin: str, effective_from: datetime, settings: dict) -> int:
    """PUT /v1/programme; the version it added."""
    body = json.dumps({"settings": settings, "effective_from": stamp(effective_from)}).encode()
    status, answer = call(service, admin, "PUT", "/v1/programme", body)
    assert status == 201, answer
    return answer["version"]


def changes_shown(page: "Page", version: int) -> dict[str, str]:
    """Opens the version's row and reads what it changed, by setting: {path: "path: old → new" less the path}."""
    page.click(f"[data-changes='{version}'] summary")
    lines = page.locator(f"[data-changes='{version}'] [data-change]")
    lines.first.wait_for()
    return {line.get_attribute("data-change"): line.inner_text().split(": ", 1)[1] for line in lines.all()}


def test_the_verify_button_is_offered_only_to_roles_that_may_verify(page, service, seeded):
    sign_in(page, service, seeded["keys"]["reader"], "/console/verify")
    page.locator("body[data-ready]").wait_for()
    assert page.locator("button", has_text="Verify the hash chain").is_disabled()
    roles = read(service, seeded["keys"]["reader"], "/openapi.json")["paths"]["/v1/audit/verify"]["get"]["x-roles"]
    assert shown(page, "verify_refused") == \
        f"This key's role (reader) may not verify the chain: GET /v1/audit/verify admits {' and '.join(roles)}."


def test_projections_show_the_publishers_reason_and_only_a_read_that_worked_its_time(
        browser, service, database, seeded):
    key = seeded["keys"]["auditor"]
    # A second service on the same database, publishing to a NATS that is not there: its publisher fails.
    publishing = ServiceProcess(database.proxy.proxied_url,
                                env={**service.extra_env, "LOYALTY_NATS_URL": f"nats://127.0.0.1:{free_port()}"})
    run_blocking(publishing.start)
    recorded = Recorded(publishing)
    context = browser.new_context(viewport=LAPTOP)
    context.route("**/*", recorded.route)
    try:
        reason = failed_publisher_reason(publishing, key)
        page = context.new_page()
        sign_in(page, publishing, key, "/console/projections")
        page.locator("body[data-ready]").wait_for()
        assert shown(page, "reason") == reason
        assert shown(page, "read_at").startswith("Read at ")
        database.down()
        try:
            page.reload()
            page.locator(".refusal[data-status='503']").wait_for()
            said = shown(page, "read_at")
            assert said.startswith("The read at ") and "failed" in said and "Read at" not in said, said
        finally:
            database.up()
        wait_for_recovery(publishing, key)
    finally:
        context.close()
        publishing.close()
    assert recorded.foreign == []


def failed_publisher_reason(service: ServiceProcess, key: str) -> str:
    """The reason GET /v1/projections gives once the publisher entry is failed."""
    deadline = time.monotonic() + 10
    while True:
        publisher = [p for p in read(service, key, "/v1/projections")["projections"] if p["name"] == "publisher"]
        if publisher and publisher[0]["state"] == "failed":
            return publisher[0]["reason"]
        assert time.monotonic() < deadline, f"the publisher did not fail: {publisher}"
        time.sleep(0.1)


def test_every_path_below_console_is_the_page_which_says_when_it_has_no_such_page(page, service, seeded):
    sign_in(page, service, seeded["keys"]["reader"], "/console/")  # a trailing slash: the start page
    page.locator("[data-field=role]").wait_for()
    page.goto(f"{service.url}/console/members/{seeded['member']}/")
    page.locator("[data-field=available]").wait_for()
    for path in ("/console/foo/bar", f"/console/members/{seeded['member']}/extra"):
        page.goto(service.url + path)
        page.get_by_role("heading", name="No such page").wait_for()
        assert page.get_by_role("link", name="Back to the console").get_attribute("href") == "/console"


def test_a_member_is_found_by_an_identity(page, service, seeded):
    sign_in(page, service, seeded["keys"]["reader"])
    page.select_option("select[name=by]", "card")
    page.fill("input[name=value]", "C-1001")
    page.click("form[role=search] button[type=submit]")
    page.wait_for_url(f"**/console/members/{seeded['member']}")
    page.locator("[data-field=available]").wait_for()
    page.goto(service.url + "/console")
    page.fill("input[name=value]", "nobody-here")
    page.click("form[role=search] button[type=submit]")
    page.locator(".refusal[data-status='404']").wait_for()


def test_the_liability_chart_renders_the_apis_months(page, service, seeded):
    sign_in(page, service, seeded["keys"]["reader"], f"/console/liability?as_of={seeded['today']}")
    chart = page.locator("[data-chart=liability][data-rendered]")
    chart.wait_for()
    answer = read(service, seeded["keys"]["reader"], "/v1/programme/liability", as_of=seeded["today"])
    assert chart.get_attribute("data-rendered") == str(len(answer["by_month"])) and len(answer["by_month"]) >= 4
    painted = page.evaluate("""() => {
        const canvas = document.querySelector('[data-chart=liability] canvas');
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let painted = 0;
        for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted++;
        return {painted, width: canvas.width, height: canvas.height};
    }""")
    assert painted["width"] > 0 and painted["painted"] > 1000, painted
    assert shown(page, "outstanding") == str(answer["outstanding"])
    cells = [row.locator("td").all_inner_texts() for row in page.locator("[data-row=month]").all()]
    assert [(c[0], c[1], c[4], c[5], c[6]) for c in cells] == [
        (m["month"], str(m["earned"]), str(m["redeemed"]), str(m["expired"]), str(m["outstanding"]))
        for m in answer["by_month"]]
    page.screenshot(path=SCREENSHOTS / "liability.png", full_page=True)


def test_operations_pages_show_the_apis_answers_or_its_refusal(page, service, seeded):
    key = seeded["keys"]["auditor"]
    sign_in(page, service, key, "/console/projections")
    projections = read(service, key, "/v1/projections")["projections"]
    page.locator("[data-row=projection]").first.wait_for()
    assert page.locator("[data-row=projection]").count() == len(projections)
    # Campaigns and programme versions (§6): rows when the server offers them, else its 404, said plainly.
    for path, api, row, listed in (("/console/campaigns", "/v1/campaigns", "campaign", "campaigns"),
                                   ("/console/programme", "/v1/programme/versions", "programme-version", "versions")):
        page.goto(service.url + path)
        page.locator("body[data-ready]").wait_for()
        status, answer = call(service, key, "GET", api)
        if status == 404:
            assert "does not offer" in page.locator(".refusal[data-status='404']").first.inner_text()
            continue
        assert status == 200 and page.locator(".refusal").count() == 0
        rows = page.locator(f"[data-row={row}]").all()
        assert len(rows) == len(answer[listed]) > 0
        for shown_row, item in zip(rows, answer[listed]):
            if row == "campaign":  # budget use as the API counts it
                assert item["campaign_id"] in shown_row.inner_text()
                assert f"{item['awarded_points']} of {item['budget_points']}" in shown_row.inner_text()
    page.goto(service.url + "/console/verify")
    page.click("text=Verify the hash chain")
    verdict = page.locator("[data-verdict]")
    verdict.wait_for()
    report = read(service, key, "/v1/audit/verify")
    assert verdict.get_attribute("data-verdict") == "ok" and report["ok"]
    assert int(shown(page, "checked")) <= report["checked"]


def test_a_database_outage_is_told_as_503_with_when_to_retry(page, service, database, seeded):
    key = seeded["keys"]["reader"]
    sign_in(page, service, key, "/console/liability")
    page.locator("[data-chart=liability][data-rendered]").wait_for()
    database.down()
    try:
        page.reload()
        refusal = page.locator(".refusal[data-status='503']").first
        refusal.wait_for()
        assert "503" in refusal.inner_text() and "Retry after" in refusal.inner_text()
    finally:
        database.up()
    wait_for_recovery(service, key)
    page.reload()
    page.locator("[data-chart=liability][data-rendered]").wait_for()


def test_no_request_leaves_127_0_0_1_and_the_key_stays_in_session_storage(page, context, recorded, service, seeded):
    key = seeded["keys"]["auditor"]
    sign_in(page, service, key, f"/console/members/{seeded['member']}")
    page.locator("[data-row=event]").first.wait_for()
    for path in ("/console/liability", "/console/campaigns", "/console/programme", "/console/projections",
                 "/console/verify", f"/console/members/{seeded['member']}?as_of={seeded['as_of']}"):
        page.goto(service.url + path)
        page.locator("body[data-ready]").wait_for()
    assert recorded.foreign == []
    assert any("/v1/members/" in url for url in recorded.urls) and any("/console/assets/" in url for url in recorded.urls)
    assert all(key not in url for url in recorded.urls), "the key travels in the Authorization header only"
    assert page.evaluate("sessionStorage.getItem('loyalty-console-key')") == key
    assert page.evaluate("localStorage.length") == 0
    assert page.evaluate("document.cookie") == "" and context.cookies() == []


def test_the_member_page_reads_on_a_phone(browser, recorded, service, seeded):
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    context.route("**/*", recorded.route)
    try:
        page = context.new_page()
        sign_in(page, service, seeded["keys"]["auditor"], f"/console/members/{seeded['member']}?as_of={seeded['today']}")
        page.locator("[data-row=ledger]").first.wait_for()
        # Wide tables scroll inside their own box; the page itself never scrolls sideways.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        page.screenshot(path=SCREENSHOTS / "member-phone.png")
    finally:
        context.close()
    assert recorded.foreign == []
