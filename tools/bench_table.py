#!/usr/bin/env python3
"""README's benchmark table from the bench's output: `cargo bench --bench cluster > bench.json`,
then `python3 tools/bench_table.py bench.json` (or on stdin). Prints the markdown table of the
scenarios present (one column each, in the bench's order; issue 9's targets in brackets), then
the SIGKILL repair times and the 1,000,000-record scenario's figures when the run has them.
Lines that are not JSON objects (cargo's own output) are skipped; a scenario that failed is
listed with its error."""

import json
import math
import sys


def load(stream):
    rows = []
    for number, line in enumerate(stream, 1):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            sys.exit(f"bench_table: line {number} is not JSON: {e}")
    return rows


def get(row, path):
    value = row
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def num(value, digits=0):
    """A figure with thousands separators; '–' when the bench has none."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def title(row):
    n, r, routing = row.get("peers"), row.get("replication", 2), row.get("routing")
    copies = "" if r == 2 else f" r={r}"
    return f"n={n}{copies} {routing}"


def fingers_bound(row):
    if row.get("routing") != "fingers":
        return ""
    return f" [≤ {0.5 * math.log2(row['peers']) + 1:.2f}]".replace(".00]", "]")


# (label, cell of one scenario): every cell from the bench's own keys.
ROWS = [
    (
        "distribute / parse-only, ms [≤ 6 at n = 5]",
        lambda r: f"{num(r.get('distribute_ms'), 1)} / {num(r.get('parse_ms'), 1)} = "
        f"{num(r.get('distribute_over_parse'), 2)}",
    ),
    (
        "mean hops round the ring [fingers ≤ ½·log2 n + 1]",
        lambda r: f"{num(r.get('mean_hops'), 2)}{fingers_bound(r)}",
    ),
    (
        "query p50 / p99 µs round the ring; p99 / p50 [≤ 3]",
        lambda r: f"{num(r.get('query_p50_us'))} / {num(r.get('query_p99_us'))}; "
        f"{num(r.get('p99_over_p50'), 2)}",
    ),
    (
        "**one CPU** (`same_cpu`): one-way µs; p50 at the owner µs, / floor [≤ 1.5]",
        lambda r: f"{num(get(r, 'same_cpu.one_way_owner_entry_us'), 1)}; "
        f"{num(get(r, 'same_cpu.query_p50_owner_entry_us'))}, "
        f"{num(get(r, 'same_cpu.p50_owner_entry_over_floor'), 2)}",
    ),
    (
        "one CPU: p50 round the ring µs, / floor [≤ 1.5]; each query over its own floor "
        "((its hops + 2) one-way), median",
        lambda r: f"{num(get(r, 'same_cpu.query_p50_us'))}, "
        f"{num(get(r, 'same_cpu.p50_over_floor'), 2)}; "
        f"{num(get(r, 'same_cpu.p50_over_own_floor'), 2)}",
    ),
    (
        "one CPU: CPU µs of a query at the owner, client + nodes, against the floor's round "
        "trip, pinger + echo; ratio",
        lambda r: f"{num(get(r, 'same_cpu.owner_entry_cpu_us.client'), 1)} + "
        f"{num(get(r, 'same_cpu.owner_entry_cpu_us.nodes'), 1)} against "
        f"{num(get(r, 'same_cpu.owner_entry_cpu_us.floor_pinger'), 1)} + "
        f"{num(get(r, 'same_cpu.owner_entry_cpu_us.floor_echo'), 1)}; "
        f"{num(get(r, 'same_cpu.owner_entry_cpu_us.query_over_round_trip'), 2)}",
    ),
    (
        "one CPU: a bare loop through three processes, µs per datagram (against one-way); p50 "
        "round the ring over (hops + 2) of it",
        lambda r: f"{num(get(r, 'same_cpu.relay_one_way_us'), 1)} "
        f"({num(get(r, 'same_cpu.one_way_us'), 1)}); "
        f"{num(get(r, 'same_cpu.p50_over_relay_floor'), 2)}",
    ),
    (
        "one CPU: CPU µs of a query round the ring, client + nodes; over (hops + 2) / 2 of "
        "the floor's round trips",
        lambda r: f"{num(get(r, 'same_cpu.ring_cpu_us.client'), 1)} + "
        f"{num(get(r, 'same_cpu.ring_cpu_us.nodes'), 1)}; "
        f"{num(get(r, 'same_cpu.ring_cpu_us.query_over_round_trip'), 2)}",
    ),
    (
        "unpinned: p50 / floor round the ring; at the owner",
        lambda r: f"{num(r.get('p50_over_floor'), 2)}; "
        f"{num(r.get('p50_owner_entry_over_floor'), 2)}",
    ),
    (
        "verify queries/s at the owner / round the ring / through the manager "
        "[≥ 40,000 at n = 5]",
        lambda r: f"{num(r.get('verify_qps'))} / {num(r.get('verify_qps_next_entry'))} / "
        f"{num(r.get('verify_qps_through_manager'))}",
    ),
    (
        "every record verified; absent ids \"not found\"",
        lambda r: f"{num(r.get('verified'))} of {num(r.get('records'))}; "
        f"{num(r.get('absent_not_found'))} of {num(r.get('absent_queried'))}",
    ),
    (
        "max/mean owned: setup / 1 join + 1 leave / 3 joins + 3 leaves [≤ 1.15]",
        lambda r: f"{num(r.get('max_over_mean'), 3)} / {num(r.get('max_over_mean_churn_1'), 3)}"
        f" / {num(r.get('max_over_mean_churn'), 3)}",
    ),
    (
        "moved by a join / a leave, owned rows [≤ 1.25/n] (1/n)",
        lambda r: f"{num(r.get('moved_join_owned'), 4)} / {num(r.get('moved_leave_owned'), 4)}"
        f" ({num(r.get('one_over_n'), 4)})",
    ),
    (
        "above idle per stored byte: peers' RSS / private / PSS [≤ 3]",
        lambda r: f"{num(r.get('peers_rss_over_raw'), 2)} / "
        f"{num(r.get('peers_private_over_raw'), 2)} / {num(r.get('peers_pss_over_raw'), 2)}",
    ),
    ("manager RSS MiB", lambda r: num(r.get("manager_rss_mib"), 1)),
    (
        "a status / a repair at rest, ms (ranges compared, none differing)",
        lambda r: f"{num(r.get('status_ms'), 1)} / {num(r.get('repair_ms'), 1)}"
        f" ({num(r.get('repair_ranges'))})",
    ),
]


def table(rows):
    out = ["| figure | " + " | ".join(title(r) for r in rows) + " |"]
    out.append("| --- " * (len(rows) + 1) + "|")
    for label, cell in ROWS:
        cells, previous = [], None
        for r in rows:
            text = cell(r)
            # A figure equal to the column before it (the same placement under both
            # routings) says so, as the README always has.
            cells.append("same" if text == previous else text)
            previous = text
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    if len(sys.argv) > 2:
        sys.exit("usage: bench_table.py [BENCH_JSON]")
    if len(sys.argv) == 2:
        with open(sys.argv[1], encoding="utf-8") as f:
            rows = load(f)
    else:
        rows = load(sys.stdin)
    failed = [r for r in rows if "error" in r and "distribute_ms" not in r]
    good = [r for r in rows if r not in failed]
    large = [r for r in good if r.get("records", 0) >= 1_000_000]
    columns = [r for r in good if r not in large]
    if not columns and not large:
        sys.exit("bench_table: no scenario in the input")
    if columns:
        print(table(columns))
    for r in good:
        kill = r.get("failure")
        if isinstance(kill, dict):
            print(
                f"\nSIGKILL of {kill.get('killed')} at n = {r.get('peers')}: ring rebuilt in "
                f"{num(kill.get('kill_to_ring_rebuilt_ms', 0) / 1e3, 2)} s, fully replicated in "
                f"{num(kill.get('kill_to_fully_replicated_ms', 0) / 1e3, 2)} s."
            )
    for r in large:
        print(
            f"\n{num(r.get('records'))} records into {r.get('peers')} peers ({r.get('routing')}):"
            f" distribute {num(r.get('distribute_ms', 0) / 1e3, 2)} s "
            f"({num(r.get('distribute_over_parse'), 2)}× the parse-only "
            f"{num(r.get('parse_ms', 0) / 1e3, 2)} s); {num(r.get('verified'))} verified "
            f"({num(r.get('verify_qps'))} queries/s at the owner); mean hops "
            f"{num(r.get('mean_hops'), 2)}; max/mean {num(r.get('max_over_mean'), 3)} / "
            f"{num(r.get('max_over_mean_churn'), 3)}; peers' PSS "
            f"{num(r.get('peers_pss_over_raw'), 2)} per stored byte; manager "
            f"{num(r.get('manager_rss_mib'), 1)} MiB; a status {num(r.get('status_ms'), 1)} ms,"
            f" a repair {num(r.get('repair_ms'), 1)} ms ({num(r.get('repair_ranges'))} ranges,"
            " none differing)."
        )
    for r in failed:
        print(f"\n{r.get('scenario')}: failed: {r.get('error')}")


if __name__ == "__main__":
    main()
