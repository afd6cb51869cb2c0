"""From a run's measurements to figures: the printed table, the chart, the README table."""

from __future__ import annotations

import re
from pathlib import Path

README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"
NOT_YET = "not yet measurable"
TEN_MILLION_COMMAND = "make bench-10m"


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def _row(figure, ours, baseline, ratio, goal, met, note=""):
    return {"figure": figure, "ours": ours, "baseline": baseline, "ratio": ratio, "goal": goal, "met": met, "note": note}


def _rounds(measured: dict) -> str:
    n = len(measured.get("rounds_rps", []))
    return f" (median of {n} alternating rounds)" if n > 1 else ""


def _lag_row(kind: str, lag: dict, detail: str, note: str = "") -> dict:
    """A lag at half the maximum ingest: percentiles in ms against the goal p99 < 500 ms."""
    p99 = lag["lag_ms"]["p99"]
    return _row(
        f"{kind} lag at half the maximum ingest ({lag['rate']:,} purchases/s offered)",
        f"p50 {_fmt(lag['lag_ms']['p50'], 'ms')}, p99 {_fmt(p99, 'ms')}, max {_fmt(lag['lag_ms']['max'], 'ms')} {detail}",
        "—", None, "p99 < 500 ms", p99 is not None and p99 < 500, note,
    )


# The member reads ``python -m bench.run --only reads`` measures (by their names in bench/lua/reads.lua)
# and the key of each one's figures in the results.
MEMBER_READS = {"balance": "reads_max", "tier": "reads_max_tier", "profile": "reads_max_profile"}


def _member_read_rows(label: str, measured: dict) -> list[dict]:
    """A member read as fast as answered, with ``min_position`` applied, and paced at half that rate."""
    ours, base = measured["ours"], measured["baseline"]
    rows = [_row(
        f"{label} read, as fast as answered ({len(measured['rounds_rps'])} alternating rounds, median)",
        f"{_fmt(ours['rps'], 'req/s')} (p99 {_fmt(ours['latency_ms']['p99'], 'ms')})",
        f"no-op aiohttp GET: {_fmt(base['rps'], 'req/s')}", measured["ratio_median"], "≥ 0.50",
        measured["ratio_median"] >= 0.50 and ours["non_2xx"] == 0,
    )]
    named = measured.get("with_min_position")
    if named:
        ratio = measured.get("with_min_position_ratio_median") or round(named["rps"] / base["rps"], 3)
        rows.append(_row(
            f"the same {label} reads with `min_position` (a position already applied: no catch-up query)",
            f"{_fmt(named['rps'], 'req/s')} (p99 {_fmt(named['latency_ms']['p99'], 'ms')})",
            f"the no-op GET above: {_fmt(base['rps'], 'req/s')}", ratio, "≥ 0.50",
            ratio >= 0.50 and named["non_2xx"] == 0,
        ))
    paced = measured["paced"]
    p99, p99_base = paced["ours"]["latency_ms"]["p99"], paced["baseline"]["latency_ms"]["p99"]
    rows.append(_row(
        f"{label} read at half that rate ({paced['rate']:,} req/s)",
        f"p50 {_fmt(paced['ours']['latency_ms']['p50'], 'ms')}, p99 {_fmt(p99, 'ms')} (at {_fmt(paced['ours']['rps'], 'req/s')})",
        f"no-op aiohttp GET: p50 {_fmt(paced['baseline']['latency_ms']['p50'], 'ms')}, p99 {_fmt(p99_base, 'ms')}",
        round(p99 / p99_base, 2) if p99_base else None, "p99 < 5 ms", p99 < 5 and paced["ours"]["non_2xx"] == 0,
        "ratio is p99 over the baseline's p99",
    ))
    return rows


def _workers_row(events: int, workers: dict) -> dict:
    """Two `loyalty project --only` workers against one running every projection, same catch-up."""
    one_s, two_s = workers["one_worker_s"], workers["two_workers_s"]
    rounds = f" (median of {len(two_s)} alternating rounds)" if len(two_s) > 1 else ""
    groups = " + ".join(",".join(group) for group in workers["groups"])
    return _row(
        f"projection catch-up over {events / 1e6:g}M events, two `loyalty project --only` workers{rounds}",
        f"{', '.join(_fmt(s, 's') for s in two_s)} to the head ({groups}; {workers['cpus']} cpus)",
        f"one worker running every projection: {', '.join(_fmt(s, 's') for s in one_s)}",
        workers["speedup_median"], "faster than one (ratio > 1)", workers["speedup_median"] > 1,
    )


def _against_no_campaigns(figure: str, measured: dict, baseline_rps: float, goal: str, met, note: str = "") -> dict:
    """Ingest with campaigns running against the same service without any, rounds alternating."""
    return _row(figure + _rounds(measured), _fmt(measured["ours"]["rps"], "req/s"),
                f"the same service without campaigns: {_fmt(baseline_rps, 'req/s')}",
                round(measured["ratio_median"], 3), goal, met, note)


def figures(out: dict) -> list[dict]:
    rows = []
    ingest = out.get("ingest")
    if ingest:
        ours, base = ingest["ours"], ingest["baseline"]
        ratio = ingest.get("ratio_median") or ours["rps"] / base["rps"]
        rows.append(_row(
            "HTTP purchase ingest, 64 connections, random members" + _rounds(ingest),
            f"{_fmt(ours['rps'], 'req/s')} ({_fmt(ingest['events_per_s'], 'events/s')}; p99 {_fmt(ours['latency_ms']['p99'], 'ms')})",
            f"no-op aiohttp POST decoding the body: {_fmt(base['rps'], 'req/s')}" + _lean_note(ingest),
            round(ratio, 3), "≥ 0.45", ratio >= 0.45,
            f"non-2xx {ours['non_2xx']}, socket errors {sum(ours['errors'].values()) - ours['non_2xx']}",
        ))
    alone = out.get("ingest_no_projectors")
    if alone and ingest:
        ours, base = alone["ours"], ingest["baseline"]
        ratio = ours["rps"] / base["rps"]
        rows.append(_row(
            "the same ingest, write path alone (LOYALTY_PROJECTORS=off)",
            f"{_fmt(ours['rps'], 'req/s')} (p99 {_fmt(ours['latency_ms']['p99'], 'ms')})",
            f"the no-op POST above: {_fmt(base['rps'], 'req/s')}", round(ratio, 3), "≥ 0.45", ratio >= 0.45,
        ))
    imp = out.get("import")
    if imp:
        copy = imp["raw"]["copy_events_per_s"]
        ratio = imp["events_per_s"] / copy
        rows.append(_row(
            "bulk import, /v1/batch (purchases, 5,000 lines a request, 2 in flight)",
            f"{_fmt(imp['events_per_s'], 'events/s')} ({_fmt(imp['commands_per_s'], 'commands/s')})",
            f"COPY of the same rows into an equivalent table: {_fmt(copy, 'events/s')} "
            f"(multi-row INSERT {_fmt(imp['raw']['insert_events_per_s'], 'events/s')})",
            round(ratio, 3), "≥ 50,000 events/s and ≥ 0.30", imp["events_per_s"] >= 50_000 and ratio >= 0.30,
        ))
        alone = imp.get("write_path_alone")
        if alone:
            ratio = alone["events_per_s"] / copy
            rows.append(_row(
                "the same /v1/batch lines, write path alone (LOYALTY_PROJECTORS=off)",
                _fmt(alone["events_per_s"], "events/s"), f"the COPY above: {_fmt(copy, 'events/s')}", round(ratio, 3),
                "≥ 50,000 events/s and ≥ 0.30", alone["events_per_s"] >= 50_000 and ratio >= 0.30,
            ))
        cli = imp.get("loyalty_import")
        if cli and "events_per_s" in cli:
            ratio = cli["events_per_s"] / copy
            rows.append(_row("bulk import, `loyalty import FILE`", _fmt(cli["events_per_s"], "events/s"),
                             f"the COPY above: {_fmt(copy, 'events/s')}", round(ratio, 3),
                             "≥ 50,000 events/s and ≥ 0.30", cli["events_per_s"] >= 50_000 and ratio >= 0.30))
        else:
            rows.append(_row("bulk import, `loyalty import FILE`", NOT_YET if cli is None else f"failed: {cli.get('error', '')[:80]}",
                             "—", None, "≥ 50,000 events/s and ≥ 0.30", None,
                             "the command does not exist yet" if cli is None else ""))
    publish = out.get("publish")
    if publish:
        backlog, raw = publish["backlog"], publish["raw_read"]["events_per_s"]
        ratio = backlog["events_per_s"] / raw
        rows.append(_row(
            f"publication of a {backlog['events'] / 1e6:g}M-event backlog to NATS JetStream (`loyalty publish`)",
            f"{_fmt(backlog['events_per_s'], 'events/s')} ({backlog['seconds']:g} s, process start included)",
            f"raw sequential read of the same events, pages of 1,000: {_fmt(raw, 'events/s')}",
            round(ratio, 3), "≥ 50,000 events/s", backlog["events_per_s"] >= 50_000,
            "" if backlog["published"] >= backlog["events"] else f"only {backlog['published']:,} published",
        ))
        lag = publish["lag"]
        rows.append(_lag_row("publish", lag, f"(recorded_at to a subscriber's receipt, {lag['messages']:,} messages)"))
    catch = out.get("catch_up")
    if catch:
        raw = catch["raw_read"]["events_per_s"]
        ratio = catch["events_per_s"] / raw
        rows.append(_row(
            f"projection catch-up over {catch['events'] / 1e6:g}M events (`loyalty project`, 5 projections)",
            f"{_fmt(catch['events_per_s'], 'events/s')} ({catch['seconds']:g} s, process start included)",
            f"raw sequential read of the events, pages of 1,000: {_fmt(raw, 'events/s')}",
            round(ratio, 3), "≥ 100,000 events/s and ≥ 0.30",
            catch["caught_up"] and catch["events_per_s"] >= 100_000 and ratio >= 0.30,
            "" if catch["caught_up"] else "did not catch up within 900 s",
        ))
        workers = catch.get("workers", {})
        if "speedup_median" in workers:
            rows.append(_workers_row(catch["events"], workers))
        rebuild = catch.get("rebuild_members", {})
        if "events_per_s" in rebuild:
            ratio = rebuild["events_per_s"] / raw
            rows.append(_row(
                f"projection rebuild over {catch['events'] / 1e6:g}M events (`loyalty rebuild members`)",
                f"{_fmt(rebuild['events_per_s'], 'events/s')} ({rebuild['seconds']:g} s)",
                f"the raw read above: {_fmt(raw, 'events/s')}", round(ratio, 3), "≥ 100,000 events/s and ≥ 0.30",
                rebuild["events_per_s"] >= 100_000 and ratio >= 0.30,
            ))
        else:
            rows.append(_row("projection rebuild (`loyalty rebuild members`)", f"failed: {rebuild.get('error', '')[:80]}",
                             "—", None, "≥ 100,000 events/s and ≥ 0.30", False))
    elif "stored" not in out:
        rows.append(_row("projection catch-up and rebuild", "not measured in this run", "raw sequential read", None,
                         "≥ 100,000 events/s and ≥ 0.30", None))
    reads = out.get("reads")
    if reads:
        ours, base = reads["ours"], reads["baseline"]
        p99, p99_base = ours["latency_ms"]["p99"], base["latency_ms"]["p99"]
        rows.append(_row(
            f"balance read at a fixed {out['plan']['paced_rate']:,} req/s",
            f"p50 {_fmt(ours['latency_ms']['p50'], 'ms')}, p99 {_fmt(p99, 'ms')} (at {_fmt(ours['rps'], 'req/s')})",
            f"no-op aiohttp GET: p50 {_fmt(base['latency_ms']['p50'], 'ms')}, p99 {_fmt(p99_base, 'ms')}",
            round(p99 / p99_base, 2) if p99_base else None, "p99 < 5 ms", p99 < 5 and ours["non_2xx"] == 0,
            "ratio is p99 over the baseline's p99",
        ))
    for read, key in MEMBER_READS.items():
        if key in out:
            rows.extend(_member_read_rows("member profile" if read == "profile" else read, out[key]))
    lag = out.get("lag")
    if lag:
        rows.append(_lag_row(
            "projection", lag, f"(at {_fmt(lag['load']['rps'], 'req/s')})",
            f"head and lowest live checkpoint sampled at 20 Hz ({lag['samples']} samples, {lag['unresolved']} never reached)",
        ))
    stored = out.get("stored")
    if stored:
        rows.append(_stored_row(stored, "quick mode: fewer events than the goal's 1M and 10M; " if out["mode"] == "quick"
                                else "" if "stored_10m" in out else f"10M: not run yet ({TEN_MILLION_COMMAND}); "))
    separate = out.get("stored_10m")
    if separate:
        catch = separate.get("catch_up") or {}
        rows.append(_stored_row(separate, f"its own run `{separate['run']}`, {separate['started_at']}: "
                                f"`{TEN_MILLION_COMMAND}`; catch-up over it {_fmt(catch.get('events_per_s'), 'events/s')}, "
                                f"rebuild `members` {_fmt(catch.get('rebuild_members', {}).get('events_per_s'), 'events/s')}; "))
    campaigns = out.get("campaigns")
    if campaigns:
        ratio, matching = campaigns["ratio_median"], campaigns["matching"]
        rows.append(_against_no_campaigns(
            f"ingest with {campaigns['campaigns']} running campaigns, {matching} granting every purchase a reward",
            campaigns, campaigns["none"]["rps"], "≥ 0.85", ratio >= 0.85,
            f"each rewarded purchase appends {matching} more points_earned events ({matching + 2} instead of 2): "
            f"{_fmt(campaigns['ours']['rps'] * (matching + 2), 'events/s')} against "
            f"{_fmt(campaigns['none']['rps'] * 2, 'events/s')}",
        ))
        one = campaigns.get("one_matching")
        if one:
            rows.append(_against_no_campaigns(
                f"the same with {campaigns['campaigns']} running campaigns, one granting every purchase a reward "
                f"(3 events a purchase)", one, one["baseline"]["rps"], "—", None,
            ))
        unmatched = campaigns.get("unmatched")
        if unmatched:
            rows.append(_against_no_campaigns(
                f"the same with {campaigns['campaigns']} running campaigns that match no purchase (judging them alone)",
                unmatched, unmatched["baseline"]["rps"], "—", None,
            ))
    simulation = out.get("simulation")
    if simulation:
        ratio = simulation["ratio_median"]
        ours, raw = simulation["ours"], simulation["raw"]
        rows.append(_row(
            f"simulation (POST /v1/simulations) over {ours['purchases']:,} stored purchases, a settings change "
            f"and a draft campaign" + _rounds(simulation),
            _fmt(ours["purchases_per_s"], "purchases/s"),
            f"raw read of the same {raw['events']:,} events: {_fmt(raw['purchases_per_s'], 'purchases/s')}",
            round(ratio, 3), "≥ 0.25", ratio >= 0.25,
            (f"its own run `{simulation['run']}`, {simulation['started_at']}; "
             if "run" in simulation else "")
            + ("the issue's goal is over 1M purchases" if ours["purchases"] < 1_000_000 else ""),
        ))
    heavy = out.get("heavy")
    if heavy:
        light_p50 = (heavy["light"]["latency_ms"]["p50"] + heavy["light_again"]["latency_ms"]["p50"]) / 2
        heavy_p50 = heavy["heavy"]["latency_ms"]["p50"]
        ratio = heavy["ratio_median"]
        cold_h = sum(heavy["cold_first_purchase_ms"]["h"]) / max(len(heavy["cold_first_purchase_ms"]["h"]), 1)
        cold_l = sum(heavy["cold_first_purchase_ms"]["l"]) / max(len(heavy["cold_first_purchase_ms"]["l"]), 1)
        rows.append(_row(
            f"purchase on a member with {heavy['events_per_heavy_member']:,} events (1 connection)"
            + (f" (median of {len(heavy['ratios_p50'])} alternating rounds)" if len(heavy["ratios_p50"]) > 1 else ""),
            f"p50 {_fmt(heavy_p50, 'ms')}, p99 {_fmt(heavy['heavy']['latency_ms']['p99'], 'ms')}",
            f"a member with {heavy['events_per_light_member']} events: p50 {_fmt(light_p50, 'ms')}, "
            f"p99 {_fmt(heavy['light']['latency_ms']['p99'], 'ms')}",
            round(ratio, 2), "≤ 1.5×", ratio <= 1.5,
            f"cold (first command after start, no snapshot): {_fmt(cold_h, 'ms')} vs {_fmt(cold_l, 'ms')}",
        ))
    es = out.get("eventsourcing")
    if es and "commands_per_s" in es.get("ours", {}) and "commands_per_s" in es.get("eventsourcing", {}):
        ratio = es["ours"]["commands_per_s"] / es["eventsourcing"]["commands_per_s"]
        rows.append(_row(
            "the purchase command in-process, 64 concurrent callers",
            _fmt(es["ours"]["commands_per_s"], "commands/s"),
            f"`eventsourcing` aggregate, load + save: {_fmt(es['eventsourcing']['commands_per_s'], 'commands/s')} "
            f"({es['eventsourcing']['conflicts']} version conflicts retried)",
            round(ratio, 2), "≥ 5×", ratio >= 5,
        ))
    rows += _growth_rows(out.get("growth_http"), "over HTTP, {} connections")
    rows += _growth_rows(out.get("growth"), "in-process, {} callers, the ledger alone")
    if ingest and ingest.get("rss_mb"):
        samples = [mb for _t, mb in ingest["rss_mb"]]
        tail = samples[len(samples) // 2:]
        growth = tail[-1] - tail[0] if tail else 0
        rows.append(_row(
            "service RSS during the ingest run",
            f"max {_fmt(max(samples), 'MB')}, {growth:+.1f} MB over the second half",
            "—", None, "< 300 MB, flat", max(samples) < 300 and growth < 0.05 * max(samples),
            f"{len(samples)} samples, 0.5 s apart; {_cache_note(ingest)}",
        ))
    check = out.get("check")
    if check:
        rows.append(_row(
            "answers after the run: GET /balance vs a replay of the log",
            f"{check['members'] - check['mismatches']}/{check['members']} equal; hash chain "
            f"{'verified' if check['chain_ok'] else 'BROKEN'} over {check['chain_checked']:,} events",
            "fold(events) + views.balance", None, "all equal", check["mismatches"] == 0 and check["chain_ok"],
        ))
    return rows


def _growth_rows(growth: dict | None, how: str) -> list[dict]:
    """CONTRACT §6.3/§6.4 beside the purchase, from one run of bench/growth.py's kinds; ``how`` says how it
    was driven, ``{}`` standing for the concurrency."""
    if not growth or "median_per_s" not in growth:
        return []
    how = how.format(growth["concurrency"])
    per_s, n = growth["median_per_s"], len(growth["rounds_per_s"]["purchase"])
    rounds = f" (median of {n} alternating rounds' ratios)" if n > 1 else ""
    activity, referral = growth["activity_over_purchase"], growth["referral_over_first_purchase"]
    over_purchase = growth.get("referral_over_purchase")  # absent from runs before it was measured
    return [
        _row(f"activity ingest {how}{rounds}", _fmt(per_s["activity"], "commands/s"),
             f"purchases, same run: {_fmt(per_s['purchase'], 'commands/s')}", activity, "≥ 1.0", activity >= 1.0),
        _row(f"a referee's first purchase rewarding its referrer (two streams), {how}{rounds}",
             _fmt(per_s["referral"], "commands/s"),
             f"a plain member's first purchase, same run: {_fmt(per_s['first_purchase'], 'commands/s')}",
             referral, "≥ 0.8", referral >= 0.8,
             "" if over_purchase is None else f"{over_purchase:.3f} of a plain purchase of a member with history"),
    ]


def _lean_note(ingest: dict) -> str:
    """The second baseline of the ingest row (bench/lean.py: the least a purchase costs), with both ratios."""
    lean = ingest.get("lean")
    if lean is None:  # a run from before the lean purchase
        return ""
    return (f"; lean purchase (`bench/lean.py`: decode, decide, seal, group commit, answer): "
            f"{_fmt(lean['rps'], 'req/s')}, {lean['rps'] / ingest['baseline']['rps']:.3f} of the no-op; "
            f"ours {ingest['ratio_to_lean_median']:.3f} of it")


def _cache_note(ingest: dict) -> str:
    fill, after = ingest.get("cache_fill"), ingest.get("cache_after")
    if not after:
        return "member cache not read"
    state = f"member cache {_fmt(after['events'], 'events')} of {after['members']:,.0f} members at the end"
    if fill:
        return (f"{state}; filled to its bound ({_fmt(fill['bound_events'], 'events')}) before the rounds by "
                f"{_fmt(fill['purchases'], 'purchases')} of other members")
    return state + " (not filled first: growth is the cache filling)"


def _stored_row(stored: dict, note: str) -> dict:
    ratio = stored["ratio_median"]
    return _row(
        f"ingest with {stored['filler']['events'] / 1e6:g}M events stored" + _rounds(stored),
        _fmt(stored["ours"]["rps"], "req/s"),
        f"the same service on an empty store: {_fmt(stored['empty']['rps'], 'req/s')}",
        round(ratio, 3), "≥ 0.80", ratio >= 0.80,
        note + f"history written by COPY in {stored['filler']['seconds']:g} s",
    )


def _met(met) -> str:
    return {True: "yes", False: "**no**", None: "—"}[met]


def table(out: dict) -> str:
    lines = [
        f"Bench `{out['name']}` ({out['mode']}), {out['started_at']}, {out['machine']['cpus']} cores, "
        f"Python {out['machine']['python']}, PostgreSQL {out['machine'].get('postgres')}, load by {out['machine']['load_generator']}",
        "",
        "| figure | ours | baseline, same run | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for row in out["figures"]:
        ours = row["ours"] + (f" ({row['note']})" if row["note"] else "")
        ratio = "—" if row["ratio"] is None else f"{row['ratio']:g}"
        lines.append(f"| {row['figure']} | {ours} | {row['baseline']} | {ratio} | {row['goal']} | {_met(row['met'])} |")
    return "\n".join(lines)


def update_readme(out: dict, readme: Path) -> None:
    """Rewrite only what lies between the bench markers (added under ## Performance when missing)."""
    text = readme.read_text(encoding="utf-8")
    block = (
        f"{README_START}\n"
        f"_Generated by `make bench{'-quick' if out['mode'] == 'quick' else ''}` "
        f"(bench/run.py); do not edit by hand. Load generator: wrk (Debian package) with Lua scripts in "
        f"bench/lua/. Chart: bench/results/bench.png; raw numbers: bench/results/{out['name']}.json._\n\n"
        f"{table(out)}\n\n"
        "Changes the measurements justified (bench/README.md has each one's numbers): group commit checks a "
        "batch's keys and versions with two set-based reads; a command decides on the cached member state without "
        "reading the log first (the append's version check under the head lock validates it; refusals and replays "
        "are answered only from a state just read); `from_data` converts into the event's own struct; the member "
        "cache is bounded by events (300,000) as well as members; a batch runs each member's lines as one series "
        "(decided in turn, queued for group commit together); events go in by binary COPY; the garbage collector "
        "is tuned for a long-lived heap; pool connections skip asyncpg's reset query; snapshots come every quarter "
        "of a member's history; the projectors share one decoded feed per process and write set-based; `loyalty "
        "import` checks the next batch of an export while PostgreSQL writes the one before.\n"
        f"{README_END}"
    )
    if README_START in text and README_END in text:
        text = re.sub(re.escape(README_START) + ".*?" + re.escape(README_END), lambda _m: block, text, flags=re.S)
    else:
        if "## Performance" not in text:
            text = text.rstrip("\n") + "\n\n## Performance\n\nHow the numbers are made, and the sums behind them: `bench/README.md`.\n"
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text, encoding="utf-8")


def chart(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    fig.suptitle(f"loyalty ledger bench `{out['name']}` ({out['mode']}), {out['started_at']}: ours vs a baseline in the same run")

    ax = axes[0][0]
    bars = []
    if "ingest" in out:
        bars.append(("HTTP ingest\n(req/s)", out["ingest"]["ours"]["rps"], out["ingest"]["baseline"]["rps"]))
    if "stored" in out:
        bars.append((f"ingest, {out['stored']['filler']['events'] / 1e6:g}M stored\n(req/s; baseline: empty)",
                     out["stored"]["ours"]["rps"], out["stored"]["empty"]["rps"]))
    es = out.get("eventsourcing", {})
    if "commands_per_s" in es.get("ours", {}) and "commands_per_s" in es.get("eventsourcing", {}):
        bars.append(("in-process command\n(commands/s)", es["ours"]["commands_per_s"], es["eventsourcing"]["commands_per_s"]))
    if bars:
        xs = range(len(bars))
        ax.bar([x - 0.2 for x in xs], [b[1] for b in bars], 0.4, label="ours", color="#2b6cb0")
        ax.bar([x + 0.2 for x in xs], [b[2] for b in bars], 0.4, label="baseline", color="#a0aec0")
        ax.set_xticks(list(xs), [b[0] for b in bars], fontsize=8)
        ax.set_title("throughput (baselines: no-op server; empty store; eventsourcing)", fontsize=9)
        ax.legend(fontsize=8)

    ax = axes[0][1]
    if "import" in out:
        imp = out["import"]
        names = ["/v1/batch", "COPY", "multi-row INSERT"]
        values = [imp["events_per_s"], imp["raw"]["copy_events_per_s"], imp["raw"]["insert_events_per_s"]]
        if "write_path_alone" in imp:
            names.insert(1, "/v1/batch, projectors off")
            values.insert(1, imp["write_path_alone"]["events_per_s"])
        cli = imp.get("loyalty_import")
        if cli and "events_per_s" in cli:
            names.insert(1, "loyalty import")
            values.insert(1, cli["events_per_s"])
        ax.bar(names, values, color=["#a0aec0" if name in ("COPY", "multi-row INSERT") else "#2b6cb0" for name in names])
        ax.axhline(50_000, color="#c53030", linestyle="--", linewidth=1, label="goal 50,000 events/s")
        ax.set_title("bulk import, events/s", fontsize=9)
        ax.legend(fontsize=8)

    ax = axes[1][0]
    latency = []
    if "reads" in out:
        latency.append(("balance GET\n@1,000/s", out["reads"]["ours"]["latency_ms"], out["reads"]["baseline"]["latency_ms"]))
    if "heavy" in out:
        latency.append(("purchase, 5,000-event\nmember vs 5", out["heavy"]["heavy"]["latency_ms"], out["heavy"]["light"]["latency_ms"]))
    if latency:
        xs = range(len(latency))
        for offset, key, shade in ((-0.3, "p50", 1.0), (-0.1, "p99", 0.6)):
            ax.bar([x + offset for x in xs], [l[1][key] for l in latency], 0.2, label=f"ours {key}", color="#2b6cb0", alpha=shade)
        for offset, key, shade in ((0.1, "p50", 1.0), (0.3, "p99", 0.6)):
            ax.bar([x + offset for x in xs], [l[2][key] for l in latency], 0.2, label=f"baseline {key}", color="#718096", alpha=shade)
        ax.axhline(5, color="#c53030", linestyle="--", linewidth=1, label="read goal p99 5 ms")
        ax.set_xticks(list(xs), [l[0] for l in latency], fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title("latency", fontsize=9)
        ax.legend(fontsize=7)

    ax = axes[1][1]
    for key, label in (("ingest", "ingest, empty store"), ("stored", "ingest, stored history")):
        samples = out.get(key, {}).get("rss_mb")
        if samples:
            ax.plot([t for t, _ in samples], [mb for _, mb in samples], label=label)
    ax.axhline(300, color="#c53030", linestyle="--", linewidth=1, label="goal 300 MB")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds into the measured run")
    ax.set_ylabel("service RSS, MB")
    ax.set_title("service memory under load", fontsize=9)
    ax.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
