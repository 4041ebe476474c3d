//! Human-readable and JSON renderings of replies, shared by `stormctl` and the demo.

use crate::client::VerifyReport;
use crate::wire::{
    DistributeReport, ExitedPeer, Placement, QueryOutcome, RecordOut, RepairReport, StatusReport,
};
use serde_json::{Map, Value, json};
use std::fmt::Write;

fn placement_name(p: Option<Placement>, table_size: u64) -> String {
    match p {
        None => "none".into(),
        Some(Placement::Consistent) => "consistent hashing".into(),
        Some(Placement::Modulo) => "hash mod n".into(),
        Some(Placement::Course) => format!("course (s = {table_size})"),
    }
}

/// The ring, like `nodetool status`.
pub fn status_text(s: &StatusReport) -> String {
    let mut out = String::new();
    let state = if s.settled { "settled" } else { "rebalancing" };
    let _ = writeln!(
        out,
        "Ring epoch {} ({state}), placement: {}, replication {}, {} peer(s)",
        s.epoch,
        placement_name(s.placement, s.table_size),
        s.replication,
        s.peers.len()
    );
    let _ = writeln!(
        out,
        "UN = up, UL = leaving (handing over), UR = registered (not in the ring yet), DN = unreachable, SN = suspected (silent, being probed), DD = dead (removed)"
    );
    let _ = writeln!(
        out,
        "--  {:>4}  {:<20} {:<22} {:<12} {:>8} {:>8} {:>8} {:>8} {:>7}",
        "ID", "Name", "Address", "State", "Records", "Owned", "Replicas", "Keys", "Share"
    );
    let or_unknown = |v: Option<u64>| v.map_or("?".into(), |r| r.to_string());
    for p in &s.peers {
        let code = p.state.code();
        let _ = writeln!(
            out,
            "{code}  {:>4}  {:<20} {:<22} {:<12} {:>8} {:>8} {:>8} {:>8} {:>6.1}%",
            p.id,
            p.name,
            p.addr.to_string(),
            p.state.to_string(),
            or_unknown(p.records),
            or_unknown(p.owned),
            or_unknown(p.replicas),
            or_unknown(p.keys),
            p.share * 100.0
        );
    }
    // Alive by their heartbeats, but their reports were lost twice over: counts unknown.
    let unreported = s
        .peers
        .iter()
        .filter(|p| p.records.is_none())
        .filter(|p| {
            use crate::wire::PeerState::{Leaving, Registered, Up};
            matches!(p.state, Up | Leaving | Registered)
        })
        .count();
    if unreported > 0 {
        let _ = writeln!(
            out,
            "{unreported} live peer(s) did not report (counts shown as ?): ask again"
        );
    }
    let total: u64 = s.peers.iter().filter_map(|p| p.records).sum();
    let owned: u64 = s.peers.iter().filter_map(|p| p.owned).sum();
    let _ = writeln!(
        out,
        "Total records: {total} held, {owned} distinct ({} copies each)",
        s.replication
    );
    if s.under_replicated_ranges == 0 && s.repairing == 0 {
        let _ = writeln!(
            out,
            "Replication: every range has its {} copies",
            s.replication
        );
    } else {
        let _ = writeln!(
            out,
            "Replication: {} under-replicated range(s), {} copies missing; {} rows being copied",
            s.under_replicated_ranges, s.under_replicated_rows, s.repairing
        );
    }
    // Trouble on the network shows here first.
    let mut sum = s.manager;
    for c in s.peers.iter().filter_map(|p| p.counters) {
        sum.retransmits += c.retransmits;
        sum.bad_datagrams += c.bad_datagrams;
        sum.duplicates += c.duplicates;
        sum.unauthenticated += c.unauthenticated;
        sum.fragmented += c.fragmented;
    }
    let _ = write!(
        out,
        "Datagrams (manager and peers): {} retransmitted, {} duplicates ignored, {} undecodable dropped, {} unauthenticated dropped; {} messages sent in fragments",
        sum.retransmits, sum.duplicates, sum.bad_datagrams, sum.unauthenticated, sum.fragmented
    );
    out
}

pub fn status_json(s: &StatusReport) -> Value {
    json!({
        "epoch": s.epoch,
        "settled": s.settled,
        "placement": s.placement,
        "replication": s.replication,
        "under_replicated_ranges": s.under_replicated_ranges,
        "under_replicated_rows": s.under_replicated_rows,
        "repairing": s.repairing,
        "manager": {
            "retransmits": s.manager.retransmits,
            "bad_datagrams": s.manager.bad_datagrams,
            "duplicates": s.manager.duplicates,
            "unauthenticated": s.manager.unauthenticated,
            "fragmented": s.manager.fragmented,
        },
        "peers": s.peers.iter().map(|p| json!({
            "id": p.id,
            "name": p.name,
            "addr": p.addr.to_string(),
            "state": p.state,
            "records": p.records,
            "keys": p.keys,
            "owned": p.owned,
            "replicas": p.replicas,
            "share": p.share,
            "token": p.token.map(|t| t.to_string()),
            "retransmits": p.counters.map(|c| c.retransmits),
            "bad_datagrams": p.counters.map(|c| c.bad_datagrams),
            "duplicates": p.counters.map(|c| c.duplicates),
            "unauthenticated": p.counters.map(|c| c.unauthenticated),
            "fragmented": p.counters.map(|c| c.fragmented),
        })).collect::<Vec<_>>(),
    })
}

/// A record as an object keyed by its (lower-cased) column names, values as in the file.
pub fn record_json(r: &RecordOut) -> Value {
    let mut m = Map::new();
    for (c, v) in r.pairs() {
        m.insert(c.to_string(), Value::String(v.to_string()));
    }
    Value::Object(m)
}

pub fn query_json(
    q: &QueryOutcome,
    elapsed_ms: f64,
    trace_id: Option<&str>,
    trace_url: Option<&str>,
) -> Value {
    json!({
        "found": q.found,
        "event_id": q.key.to_string(),
        "records": q.records.iter().map(record_json).collect::<Vec<_>>(),
        "path": q.path,
        "path_names": q.path_names,
        "hops": q.path.len(),
        "truncated": q.truncated,
        "elapsed_ms": elapsed_ms,
        "ring_ms": q.ring_micros as f64 / 1e3,
        "timeline": q.hops.iter().enumerate().map(|(i, h)| json!({
            "hop": i,
            "peer": h.peer,
            "name": h.name,
            "addr": h.addr.map(|a| a.to_string()),
            "at_ms": h.at_us as f64 / 1e3,
        })).collect::<Vec<_>>(),
        "trace_id": trace_id,
        "trace_url": trace_url,
    })
}

/// The walk as a terminal waterfall, as Jaeger draws its trace: one line per hop, a bar from
/// when the hop received the query to when the next one did (the last: to the answer at the
/// `origin`, which sent the query into the ring: stormctl, or the manager). Times are on the
/// origin's clock, from sending the query.
pub fn waterfall_text(q: &QueryOutcome, origin: &str) -> String {
    const WIDTH: usize = 40;
    let total = q.ring_micros.max(1);
    let col = |us: u64| ((us.min(total) as f64 / total as f64) * WIDTH as f64).round() as usize;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "walk of event {}: {} hop(s), {:.3} ms in the ring",
        q.key,
        q.hops.len(),
        q.ring_micros as f64 / 1e3
    );
    let label_width = q
        .hops
        .iter()
        .map(|h| format!("{}:{}", h.peer, h.name).len())
        .max()
        .unwrap_or(0)
        .max(7);
    let _ = writeln!(
        out,
        "  {:<5} {:<label_width$} {:<21} {:>10}  |{}|",
        "",
        origin,
        "",
        "+0.000 ms",
        "▏".to_string() + &" ".repeat(WIDTH - 1)
    );
    for (i, h) in q.hops.iter().enumerate() {
        let end = q.hops.get(i + 1).map_or(q.ring_micros, |n| n.at_us);
        let (a, b) = (col(h.at_us), col(end.max(h.at_us)));
        let bar_len = (b.saturating_sub(a)).max(1).min(WIDTH - a.min(WIDTH - 1));
        let bar = format!(
            "{}{}{}",
            " ".repeat(a.min(WIDTH - 1)),
            "█".repeat(bar_len),
            " ".repeat(WIDTH.saturating_sub(a.min(WIDTH - 1) + bar_len))
        );
        let addr = h.addr.map_or("?".into(), |a| a.to_string());
        let _ = writeln!(
            out,
            "  hop {:<2}{:<label_width$} {:<21} {:>7.3} ms  |{bar}|",
            i,
            format!("{}:{}", h.peer, h.name),
            addr,
            h.at_us as f64 / 1e3
        );
    }
    let _ = write!(
        out,
        "  {:<5} {:<label_width$} {:<21} {:>7.3} ms  answer back at {origin}",
        "",
        origin,
        "",
        q.ring_micros as f64 / 1e3
    );
    out
}

pub fn path_text(q: &QueryOutcome) -> String {
    q.path
        .iter()
        .zip(&q.path_names)
        .map(|(id, name)| format!("{id}:{name}"))
        .collect::<Vec<_>>()
        .join(" -> ")
}

pub fn query_text(q: &QueryOutcome, elapsed_ms: f64) -> String {
    let mut out = String::new();
    if q.found {
        let _ = writeln!(out, "event {}: found, {} record(s)", q.key, q.records.len());
        for (i, r) in q.records.iter().enumerate() {
            if q.records.len() > 1 {
                let _ = writeln!(out, "  record {}:", i + 1);
            }
            let width = r.columns.fields().map(str::len).max().unwrap_or(0);
            for (c, v) in r.pairs() {
                let _ = writeln!(out, "    {c:<width$}  {v}");
            }
        }
        if q.truncated {
            let _ = writeln!(out, "  (more rows exist than fit in an answer)");
        }
    } else {
        let _ = writeln!(out, "event {}: not found", q.key);
    }
    let _ = write!(
        out,
        "path ({} hop(s)): {}\ntime: {elapsed_ms:.3} ms",
        q.path.len(),
        path_text(q)
    );
    out
}

pub fn distribute_text(d: &DistributeReport) -> String {
    let mut out = String::new();
    let secs = d.elapsed_micros as f64 / 1e6;
    let rate = if secs > 0.0 {
        d.stored as f64 / secs
    } else {
        0.0
    };
    let _ = writeln!(out, "distributed {} ({})", d.path, d.format);
    let _ = writeln!(
        out,
        "read {}, stored {} ({} new, {} already held), rejected {}, fallback keys {}",
        d.read,
        d.stored,
        d.new_rows,
        d.stored - d.new_rows.min(d.stored),
        d.rejected,
        d.fallback_keys
    );
    for (line, reason) in &d.rejected_samples {
        let _ = writeln!(out, "  rejected line {line}: {reason}");
    }
    let per_peer: Vec<String> = d
        .per_peer
        .iter()
        .map(|(id, n)| format!("{id}:{n}"))
        .collect();
    let _ = writeln!(out, "per peer: {}", per_peer.join(" "));
    let _ = write!(
        out,
        "{} batches in {:.1} ms ({rate:.0} records/s)",
        d.batches,
        secs * 1e3
    );
    out
}

pub fn verify_text(v: &VerifyReport) -> String {
    let mut out = format!(
        "verify {}: {} keys ({} rows): {} found, {} missing, {} mismatched, {} errors in {:.0} ms",
        v.file, v.keys, v.rows, v.found, v.missing, v.mismatched, v.errors, v.elapsed_ms
    );
    for (label, ids) in [
        ("missing", &v.first_missing),
        ("mismatched", &v.first_mismatched),
        ("errors", &v.first_errors),
    ] {
        if !ids.is_empty() {
            let _ = write!(out, "\n  first {label}: {}", ids.join(", "));
        }
    }
    out
}

/// A repair's answer: what was compared, what differed, who was asked to copy.
pub fn repair_text(r: &RepairReport) -> String {
    let mut out = format!(
        "repair of ring epoch {}: {} ranges compared, {} differed",
        r.epoch, r.checked_ranges, r.diverged_ranges
    );
    if r.diverged_ranges > 0 {
        let _ = write!(
            out,
            "; asked {} to copy their rows of them to the other holders (status shows when every range has its copies)",
            r.peers_asked.join(", ")
        );
    }
    if r.unchecked_ranges > 0 {
        let _ = write!(
            out,
            "\n{} ranges not compared: a holder did not report, or was still handing rows over; run repair again",
            r.unchecked_ranges
        );
    }
    out
}

/// A teardown's answer: one line per peer, confirmed or not.
pub fn teardown_text(exited: &[ExitedPeer]) -> String {
    let confirmed = exited.iter().filter(|p| p.confirmed).count();
    let mut out = format!(
        "torn down: {confirmed} of {} peer(s) confirmed they are exiting",
        exited.len()
    );
    for p in exited {
        let state = if p.confirmed {
            "exiting"
        } else {
            "did not answer (it may be gone already; stop it by hand if not)"
        };
        let _ = write!(
            out,
            "\n  peer {:>3} {:<20} {:<22} {state}",
            p.id, p.name, p.addr
        );
    }
    out
}

pub fn teardown_json(exited: &[ExitedPeer]) -> Value {
    json!({
        "peers": exited.len(),
        "confirmed": exited.iter().filter(|p| p.confirmed).count(),
        "exited": exited
            .iter()
            .map(|p| json!({ "id": p.id, "name": p.name, "addr": p.addr.to_string(), "confirmed": p.confirmed }))
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{PeerState, PeerStatus};

    fn peer(id: u32, state: PeerState, records: Option<u64>) -> PeerStatus {
        PeerStatus {
            id,
            name: format!("p{id}"),
            addr: ([127, 0, 0, 1], 6000 + id as u16).into(),
            state,
            records,
            keys: records,
            token: Some(u64::from(id)),
            share: 0.5,
            counters: None,
            owned: records,
            replicas: records.map(|_| 0),
        }
    }

    fn report(peers: Vec<PeerStatus>) -> StatusReport {
        StatusReport {
            epoch: 3,
            settled: true,
            placement: Some(Placement::Consistent),
            table_size: 0,
            peers,
            manager: Default::default(),
            replication: 1,
            under_replicated_ranges: 0,
            under_replicated_rows: 0,
            repairing: 0,
        }
    }

    #[test]
    fn a_live_peer_without_counts_is_shown_unknown_and_named_in_a_line() {
        let text = status_text(&report(vec![
            peer(1, PeerState::Up, Some(10)),
            peer(2, PeerState::Up, None),
        ]));
        let line = text
            .lines()
            .find(|l| l.contains(" p2 "))
            .expect("p2's line");
        assert!(line.starts_with("UN") && line.contains('?'), "{line}");
        assert!(
            text.contains("1 live peer(s) did not report (counts shown as ?): ask again"),
            "{text}"
        );
    }

    #[test]
    fn unreachable_and_dead_peers_are_not_counted_as_unreported() {
        let text = status_text(&report(vec![
            peer(1, PeerState::Up, Some(10)),
            peer(2, PeerState::Unreachable, None),
            peer(3, PeerState::Dead, None),
        ]));
        assert!(!text.contains("did not report"), "{text}");
        assert!(text.contains("Total records: 10 held"), "{text}");
    }
}
