//! Real `stormd` processes on loopback: a manager and peers, driven by the real `stormctl`.

mod support;

use serde_json::Value;
use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;
use support::*;

const DETAILS_1996_ROWS: u64 = 48_534;

/// The whole life of a cluster on the real 1996 file: distribute, every record found with the
/// right fields, a leave, every record still found, teardown, manager shutdown.
#[test]
fn full_lifecycle_on_details_1996() {
    let file = shared_data("details-1996.csv");
    let mut cluster = Cluster::start(5);
    let setup = cluster.ctl_json(&["setup"]);
    assert_eq!(setup["peers"].as_array().map(Vec::len), Some(5), "{setup}");
    assert!(
        setup["peers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["state"] == "up")
    );

    let d = cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    assert_eq!(d["read"], DETAILS_1996_ROWS, "{d}");
    assert_eq!(d["stored"], DETAILS_1996_ROWS, "{d}");
    assert_eq!(d["new_rows"], DETAILS_1996_ROWS, "{d}");
    assert_eq!(d["rejected"], 0, "{d}");
    // Two copies of every record: each range's batches go to its two holders.
    assert!(
        d["batches"].as_u64().unwrap() < 400,
        "rows must be batched: {d}"
    );
    assert_eq!(records_total(&cluster.status()), DETAILS_1996_ROWS);

    let v = cluster.verify(&file);
    assert_eq!(v["found"], DETAILS_1996_ROWS, "{v}");
    assert_eq!(
        (v["missing"].as_u64(), v["mismatched"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );

    // One record in full: every column, keyed by lower-cased name, values as in the file.
    let q = cluster.ctl_json(&["query", "5570068"]);
    assert_eq!(q["found"], true);
    assert_eq!(q["event_id"], "5570068");
    let r = &q["records"][0];
    assert_eq!(r["state"], "ILLINOIS");
    assert_eq!(r["cz_name"], "HANCOCK");
    assert_eq!(r["damage_property"], "0K");
    assert_eq!(r["tor_f_scale"], "");
    assert_eq!(r.as_object().map(|o| o.len()), Some(14));
    assert!(!q["path"].as_array().unwrap().is_empty());

    // A leave: its records go to the successor, and every record is still found.
    let before = cluster.status();
    let leaving = cluster.ctl_json(&["leave", "peer-2"]);
    assert_eq!(leaving["name"], "peer-2");
    let status = cluster
        .peer("peer-2")
        .wait(Duration::from_secs(20))
        .expect("peer-2 exits after leaving");
    assert_eq!(status.code(), Some(0));
    let after = cluster.wait_settled();
    assert_eq!(after["peers"].as_array().map(Vec::len), Some(4), "{after}");
    assert_eq!(
        records_total(&after),
        DETAILS_1996_ROWS,
        "before {before}\nafter {after}"
    );
    let v = cluster.verify(&file);
    assert_eq!(v["found"], DETAILS_1996_ROWS, "{v}");

    // Teardown: every peer exits 0; the manager stays up, then exits 0 on SIGTERM.
    let t = cluster.ctl_json(&["teardown"]);
    assert_eq!(
        (t["peers"].as_u64(), t["confirmed"].as_u64()),
        (Some(4), Some(4)),
        "{t}"
    );
    let mut exiting: Vec<&str> = t["exited"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    exiting.sort_unstable();
    assert_eq!(exiting, ["peer-0", "peer-1", "peer-3", "peer-4"], "{t}");
    for p in cluster.peers.iter_mut().filter(|p| p.name != "peer-2") {
        let status = p
            .wait(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{} still running", p.name));
        let errs = p.drain_stderr().to_vec();
        assert_eq!(status.code(), Some(0), "{}: {errs:?}", p.name);
    }
    assert_eq!(cluster.status()["peers"].as_array().map(Vec::len), Some(0));
    assert_eq!(
        cluster.manager.stop("TERM"),
        Some(0),
        "manager exits 0 on SIGTERM"
    );
}

#[test]
fn sigterm_on_a_peer_is_a_graceful_leave() {
    let file = shared_data("details-1950.csv");
    let mut cluster = Cluster::start(4);
    cluster.ctl_json(&["setup"]);
    let d = cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    assert_eq!(d["stored"], 223);
    let holding = cluster.status()["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["records"].as_u64() > Some(0))
        .map(|p| p["name"].as_str().unwrap().to_string())
        .unwrap();
    cluster.peer(&holding).signal("TERM");
    let status = cluster
        .peer(&holding)
        .wait(Duration::from_secs(20))
        .expect("exits after SIGTERM");
    assert_eq!(
        status.code(),
        Some(0),
        "{:?}",
        cluster.peer(&holding).drain_stderr()
    );
    let after = cluster.wait_settled();
    assert_eq!(after["peers"].as_array().map(Vec::len), Some(3));
    assert_eq!(records_total(&after), 223);
    assert_eq!(cluster.verify(&file)["found"], 223);
    // SIGINT stops the manager with 0 as well.
    assert_eq!(cluster.manager.stop("INT"), Some(0));
}

#[test]
fn a_peer_joining_after_setup_takes_over_its_share() {
    let file = shared_data("details-1950.csv");
    let mut cluster = Cluster::start(3);
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    cluster.add_peer("late");
    cluster.wait_for_peers(4);
    let s = cluster.wait_settled();
    let late = s["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "late")
        .cloned()
        .unwrap();
    assert_eq!(late["state"], "up", "{s}");
    assert!(
        late["records"].as_u64().unwrap() > 0,
        "the joiner holds nothing: {s}"
    );
    assert_eq!(records_total(&s), 223);
    assert_eq!(cluster.verify(&file)["found"], 223);
}

#[test]
fn distributing_twice_stores_nothing_twice() {
    let file = shared_data("details-1950.csv");
    let cluster = Cluster::start(3);
    cluster.ctl_json(&["setup"]);
    let first = cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    let second = cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    assert_eq!(
        (first["new_rows"].as_u64(), second["new_rows"].as_u64()),
        (Some(223), Some(0))
    );
    assert_eq!(second["stored"], 223);
    assert_eq!(records_total(&cluster.status()), 223);
}

/// `stormctl repair` on real processes: refused with a reason before there is a ring; on a
/// settled ring with every copy in place, every range compared (all holders reported rows
/// and digests) and none differing. (Copies lost behind the protocol's back, which only a
/// repair finds, are made and repaired in the simulations: `sim::failures::a_repair_*`.)
#[test]
fn repair_compares_every_range_of_a_settled_ring() {
    let file = shared_data("details-1950.csv");
    let cluster = Cluster::start(3);
    let early = cluster.ctl(&["repair"]);
    assert_eq!(early.status.code(), Some(2));
    let err = String::from_utf8_lossy(&early.stderr);
    assert!(err.contains("no ring yet"), "{err}");
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    let status = cluster.status();
    let r = cluster.ctl_json(&["repair"]);
    assert_eq!(r["epoch"], status["epoch"], "{r} {status}");
    assert_eq!(r["diverged_ranges"], 0, "{r}");
    assert_eq!(r["unchecked_ranges"], 0, "{r}");
    assert!(r["checked_ranges"].as_u64().is_some_and(|n| n >= 3), "{r}");
    assert_eq!(r["peers_asked"].as_array().map(Vec::len), Some(0), "{r}");
    let out = cluster.ctl(&["repair"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ranges compared, 0 differed"), "{text}");
}

#[test]
fn query_output_and_exit_statuses() {
    let file = shared_data("details-1950.csv");
    let cluster = Cluster::start(5);
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    // Found: exit 0; the path walks the ring and ends at the owner.
    let out = cluster.ctl(&["--json", "query", "10096222", "--via", "peer-0"]);
    assert_eq!(out.status.code(), Some(0));
    let q = parse_json(&out);
    assert_eq!(q["records"][0]["tor_f_scale"], "F3");
    // Peers register concurrently: find peer-0's id by its name.
    let status = cluster.status();
    let peer0 = status["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "peer-0"))
        .and_then(|p| p["id"].as_u64());
    assert_eq!(q["path"][0].as_u64(), peer0, "{q} {status}");
    // Not found: exit 1.
    let out = cluster.ctl(&["--json", "query", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(parse_json(&out)["found"], false);
    // Not an id: exit 2 with a message.
    let out = cluster.ctl(&["query", "not-a-number"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-a-number"));
    // Human output shows the record, the path and the time.
    let out = cluster.ctl(&["query", "10096222"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("OKLAHOMA") && text.contains("path (") && text.contains("time:"),
        "{text}"
    );
    // A bad --via is an error, not a hang.
    let out = cluster.ctl(&["query", "10096222", "--via", "nobody"]);
    assert_eq!(out.status.code(), Some(2));
    // The walk's timeline: one entry per hop, in order, each hop's address, inside the time
    // the query spent in the ring; drawn as a waterfall with --trace.
    let out = cluster.ctl(&["--json", "query", "1", "--via", "peer-0"]);
    let q = parse_json(&out);
    let timeline = q["timeline"].as_array().expect("a timeline");
    assert_eq!(
        timeline.len(),
        q["path"].as_array().map_or(0, Vec::len),
        "{q}"
    );
    assert!(
        timeline.len() >= 2,
        "an absent id walks to its holders: {q}"
    );
    let at: Vec<f64> = timeline
        .iter()
        .filter_map(|h| h["at_ms"].as_f64())
        .collect();
    assert!(
        at.windows(2).all(|w| w[0] <= w[1]),
        "hops in time order: {q}"
    );
    let ring_ms = q["ring_ms"].as_f64().unwrap_or(0.0);
    assert!(at.iter().all(|t| *t <= ring_ms + 0.001), "{q}");
    for (hop, id) in timeline.iter().zip(q["path"].as_array().unwrap()) {
        assert_eq!(&hop["peer"], id);
        assert!(
            hop["addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{q}"
        );
    }
    let out = cluster.ctl(&["query", "1", "--via", "peer-0", "--trace"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("walk of event 1:") && text.contains("hop 0") && text.contains("peer-0"),
        "{text}"
    );
    assert!(text.contains("answer back at stormctl"), "{text}");
    // Through the manager, as in the original design: the same walk, two more datagrams.
    let out = cluster.ctl(&[
        "query",
        "1",
        "--via",
        "peer-0",
        "--trace",
        "--through-manager",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("answer back at the manager"), "{text}");
    assert!(text.contains("hop 0") && text.contains("peer-0"), "{text}");
}

#[test]
fn stormctl_fails_clearly_when_no_manager_answers() {
    // A port nobody listens on: bind one, then drop it.
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::time::Instant::now();
    let out = ctl_at(&format!("127.0.0.1:{port}"), &["status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not answer"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[test]
fn wrong_config_values_fail_at_start_naming_key_and_source() {
    let out = std::process::Command::new(STORMD)
        .env("STORM_ROLE", "mangaer")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`role`") && err.contains("STORM_ROLE"),
        "{err}"
    );

    let dir = std::env::temp_dir().join(format!("stormd-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "role = \"peer\"\nmanager = \"no-port-here\"\n").unwrap();
    let out = std::process::Command::new(STORMD)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`manager`") && err.contains("bad.toml"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_taken_name_is_refused() {
    let mut cluster = Cluster::start(2);
    let mut env = cluster.peer_env("peer-0");
    // The reason is shown even when the log shows only warnings (500 peers started by hand
    // at `warn` exited 1 without a word).
    env.push(("RUST_LOG", "warn".to_string()));
    let mut dup = Daemon::start("dup", &env);
    let status = dup
        .wait(Duration::from_secs(10))
        .expect("the duplicate exits");
    assert_eq!(status.code(), Some(1));
    assert!(
        dup.drain_stderr().iter().any(|l| l.contains("taken")),
        "{:?}",
        dup.stderr_lines
    );
    assert_eq!(cluster.status()["peers"].as_array().map(Vec::len), Some(2));
    assert!(cluster.peer("peer-0").is_running());
}

/// Garbage, truncated envelopes, unknown commands and commands for the wrong role: both the
/// manager and a peer answer what they can, count the rest, and keep serving.
#[test]
fn malformed_datagrams_and_unknown_commands_do_not_stop_the_service() {
    let file = shared_data("details-1950.csv");
    let cluster = Cluster::start(3);
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let peer_addr = cluster.peers[0].addr;
    let targets = [cluster.manager.addr, peer_addr];

    let mut rng: rand::rngs::SmallRng = rand::SeedableRng::seed_from_u64(0x1234_5678_9abc_def0);
    for target in targets {
        // Random bytes of many lengths.
        for len in [0usize, 1, 2, 7, 64, 512, 1400, 9000, 65_000] {
            let bytes: Vec<u8> = (0..len).map(|_| rand::Rng::random(&mut rng)).collect();
            sock.send_to(&bytes, target).unwrap();
        }
    }

    // A well-formed envelope whose command this build does not know: a rejection comes back.
    let unknown = cbor(
        &serde_json::json!({"v": stormdht::wire::PROTOCOL_VERSION, "from": 77, "seq": 5, "body": {"Frobnicate": {"x": 1}}}),
    );
    for target in targets {
        sock.send_to(&unknown, target).unwrap();
        let reply = recv_json(&sock);
        assert_eq!(reply["body"]["Reject"]["seq"], 5, "{reply}");
        // The reason is typed on the wire: a malformed message, with the decoder's detail.
        assert!(
            reply["body"]["Reject"]["reason"]["Malformed"]["detail"]
                .as_str()
                .is_some_and(|d| d.contains("unknown")),
            "{reply}"
        );
    }
    // Another protocol version: a rejection that says so.
    let future = cbor(&serde_json::json!({"v": 99, "from": 77, "seq": 6, "body": "LeaveRequest"}));
    sock.send_to(&future, cluster.manager.addr).unwrap();
    let reply = recv_json(&sock);
    assert_eq!(
        reply["body"]["Reject"]["reason"]["Version"]["got"], 99,
        "{reply}"
    );
    // A client command sent to a peer: rejected with a pointer to the manager.
    let status_to_peer = cbor(
        &serde_json::json!({"v": stormdht::wire::PROTOCOL_VERSION, "from": 78, "seq": 1, "body": {"Request": "Status"}}),
    );
    sock.send_to(&status_to_peer, peer_addr).unwrap();
    let reply = recv_json(&sock);
    assert!(
        reply["body"]["Reject"]["reason"]["ClientCommandToPeer"]["kind"] == "status",
        "{reply}"
    );

    // Both still serve, and both counted what they dropped.
    let s = cluster.status();
    assert_eq!(records_total(&s), 223, "{s}");
    assert!(s["manager"]["bad_datagrams"].as_u64() >= Some(9), "{s}");
    let peer0 = s["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "peer-0")
        .unwrap();
    assert!(peer0["bad_datagrams"].as_u64() >= Some(9), "{s}");
    let q = cluster.ctl_json(&["query", "10096222", "--via", "peer-0"]);
    assert_eq!(q["found"], true);
}

fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::ser::into_writer(v, &mut out).unwrap();
    out
}

fn recv_json(sock: &UdpSocket) -> Value {
    let mut buf = vec![0u8; 65_536];
    let (n, _) = sock.recv_from(&mut buf).expect("a reply datagram");
    ciborium::de::from_reader(&buf[..n]).expect("a CBOR reply")
}

/// The full NOAA forms in one cluster: a 51-column details file and a gzip-compressed locations
/// file (several rows per event). A query returns the details row and every location row; a
/// broken row is rejected with its line number, a row without an id gets a fallback key.
#[test]
fn details_and_gzipped_locations_share_keys_and_bad_rows_are_reported() {
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;
    let dir = std::env::temp_dir().join(format!("stormd-noaa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let header = "BEGIN_YEARMONTH,BEGIN_DAY,BEGIN_TIME,END_YEARMONTH,END_DAY,END_TIME,EPISODE_ID,EVENT_ID,STATE,STATE_FIPS,YEAR,MONTH_NAME,EVENT_TYPE,CZ_TYPE,CZ_FIPS,CZ_NAME,WFO,BEGIN_DATE_TIME,CZ_TIMEZONE,END_DATE_TIME,INJURIES_DIRECT,INJURIES_INDIRECT,DEATHS_DIRECT,DEATHS_INDIRECT,DAMAGE_PROPERTY,DAMAGE_CROPS,SOURCE,MAGNITUDE,MAGNITUDE_TYPE,FLOOD_CAUSE,CATEGORY,TOR_F_SCALE,TOR_LENGTH,TOR_WIDTH,TOR_OTHER_WFO,TOR_OTHER_CZ_STATE,TOR_OTHER_CZ_FIPS,TOR_OTHER_CZ_NAME,BEGIN_RANGE,BEGIN_AZIMUTH,BEGIN_LOCATION,END_RANGE,END_AZIMUTH,END_LOCATION,BEGIN_LAT,BEGIN_LON,END_LAT,END_LON,EPISODE_NARRATIVE,EVENT_NARRATIVE,DATA_SOURCE";
    let row = |id: &str, state: &str| {
        format!(
            "202305,12,1530,202305,12,1545,178001,{id},{state},40,2023,May,Tornado,C,1,ADAIR,TSA,12-MAY-23 15:30:00,CST-6,12-MAY-23 15:45:00,0,0,0,0,10.00K,0.00K,NWS Storm Survey,,,,,EF1,2.1,150,,,,,1,N,STILWELL,2,NE,STILWELL,35.8,-94.6,35.82,-94.58,\"Storms formed, \"\"quickly\"\"\nalong a front.\",\"A brief tornado.\",CSV"
        )
    };
    let details = format!(
        "{header}\n{}\n{}\n{}\n202305,12,1530,broken row\n{}\n",
        row("1100001", "OKLAHOMA"),
        row("1100002", "KANSAS"),
        row("", "NOWHERE"),
        row("1100003", "TEXAS")
    );
    let details_path = dir.join("StormEvents_details-ftp_v1.0_d2023_c20240101.csv");
    std::fs::write(&details_path, details).unwrap();
    let locations = "YEARMONTH,EPISODE_ID,EVENT_ID,LOCATION_INDEX,RANGE,AZIMUTH,LOCATION,LATITUDE,LONGITUDE,LAT2,LON2\n\
        202305,178001,1100001,1,1,N,STILWELL,35.8,-94.6,3548000,9436000\n\
        202305,178001,1100001,2,2,NE,STILWELL,35.82,-94.58,3549200,9434800\n\
        202305,178001,1100001,3,3,E,WESTVILLE,35.99,-94.57,3559400,9434200\n\
        202305,178001,1100002,1,0,N,TULSA,36.1,-95.9,3606000,9554000\n";
    let locations_path = dir.join("StormEvents_locations-ftp_v1.0_d2023_c20240101.csv.gz");
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(locations.as_bytes()).unwrap();
    std::fs::write(&locations_path, gz.finish().unwrap()).unwrap();

    let cluster = Cluster::start(3);
    cluster.ctl_json(&["setup"]);
    let d = cluster.ctl_json(&["distribute", "--file", details_path.to_str().unwrap()]);
    assert_eq!(
        (
            d["read"].as_u64(),
            d["stored"].as_u64(),
            d["rejected"].as_u64()
        ),
        (Some(5), Some(4), Some(1)),
        "{d}"
    );
    assert_eq!(d["fallback_keys"], 1, "{d}");
    // Header on line 1, then three rows of two lines each (their narratives hold a newline).
    assert_eq!(d["rejected_samples"][0][0], 8, "{d}");
    let l = cluster.ctl_json(&["distribute", "--file", locations_path.to_str().unwrap()]);
    assert_eq!(
        (l["read"].as_u64(), l["stored"].as_u64()),
        (Some(4), Some(4)),
        "{l}"
    );
    assert!(l["format"].as_str().unwrap().contains("locations"), "{l}");

    let q = cluster.ctl_json(&["query", "1100001"]);
    let records = q["records"].as_array().unwrap();
    assert_eq!(
        records.len(),
        4,
        "one details row and three location rows: {q}"
    );
    let details_row = records
        .iter()
        .find(|r| r.get("event_narrative").is_some())
        .expect("the details row");
    assert_eq!(details_row["state"], "OKLAHOMA");
    assert_eq!(
        details_row["episode_narrative"],
        "Storms formed, \"quickly\"\nalong a front."
    );
    assert_eq!(details_row.as_object().unwrap().len(), 51);
    let mut indexes: Vec<&str> = records
        .iter()
        .filter_map(|r| r["location_index"].as_str())
        .collect();
    indexes.sort();
    assert_eq!(indexes, ["1", "2", "3"]);

    // The row without an id is stored under a stable fallback key, and found by it.
    let fallback = stormdht::record::load_path(&details_path)
        .unwrap()
        .rows
        .iter()
        .find(|r| r.values.field(7) == Some(""))
        .map(|r| stormdht::record::fallback_key(r.values.fields()))
        .unwrap();
    let q = cluster.ctl_json(&["query", &fallback.to_string()]);
    assert_eq!(q["found"], true, "{q}");
    assert_eq!(q["records"][0]["state"], "NOWHERE");

    // verify checks both files, multi-row keys included.
    assert_eq!(cluster.verify(&details_path)["found"], 4);
    assert_eq!(cluster.verify(&locations_path)["found"], 2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The main job: `stormd demo` runs a whole cluster on loopback and exits 0.
#[test]
fn the_demo_runs_end_to_end() {
    let mut child = std::process::Command::new(STORMD)
        .arg("demo")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("STORM_LISTEN", "127.0.0.1:0")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the demo did not finish in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "== setup",
        "read 300, stored 300",
        "path ",
        "left",
        "300 found, 0 missing",
        "ranges compared, 0 differed",
        "demo finished",
    ] {
        assert!(text.contains(expected), "missing '{expected}' in:\n{text}");
    }
}

/// Real processes on a bad network: every process drops 10% and duplicates 10% of what it
/// sends. Distribute, a leave and a join still lose nothing and store nothing twice.
#[test]
fn a_lossy_duplicating_network_loses_nothing() {
    let file = shared_data("details-1950.csv");
    let chaos = [
        ("STORM_CHAOS__LOSS", "0.1".to_string()),
        ("STORM_CHAOS__DUPLICATE", "0.1".to_string()),
        // Settings for a lossy network: retransmit sooner and longer, so that a message lost
        // several times in a row (0.19 per attempt, loss both ways) does not look like a dead
        // peer, and give a query time for a few such losses along its walk.
        ("STORM_RETRY__MAX_MS", "400".to_string()),
        ("STORM_RETRY__ATTEMPTS", "30".to_string()),
        ("STORM_QUERY_TIMEOUT_MS", "20000".to_string()),
    ];
    let mut cluster = Cluster::start_with(4, &chaos);
    cluster.ctl_json(&["setup"]);
    let d = cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    assert_eq!(
        (d["stored"].as_u64(), d["new_rows"].as_u64()),
        (Some(223), Some(223)),
        "{d}"
    );
    assert_eq!(cluster.verify(&file)["found"], 223);
    cluster.ctl_json(&["leave", "peer-1"]);
    assert_eq!(
        cluster
            .peer("peer-1")
            .wait(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
    cluster.add_peer("late");
    cluster.wait_for_peers(4);
    let s = cluster.wait_settled();
    assert_eq!(records_total(&s), 223, "{s}");
    let peers = s["peers"].as_array().unwrap();
    let sum = |k: &str| {
        peers.iter().filter_map(|p| p[k].as_u64()).sum::<u64>()
            + s["manager"][k].as_u64().unwrap_or(0)
    };
    assert!(
        sum("retransmits") > 0 && sum("duplicates") > 0,
        "the chaos should show: {s}"
    );
    assert_eq!(cluster.verify(&file)["found"], 223);
    cluster.ctl_json(&["teardown"]);
    for p in cluster.peers.iter_mut().filter(|p| p.name != "peer-1") {
        assert_eq!(
            p.wait(Duration::from_secs(30)).and_then(|s| s.code()),
            Some(0),
            "{}",
            p.name
        );
    }
}

/// `stormd health` with the daemon's own configuration: 0 when the manager or a peer answers
/// on its port, 1 with a reason when nothing listens there or the cluster key differs.
#[test]
fn health_checks_answer_for_running_daemons_only() {
    let key = "health-check-key-0123456789abcdef";
    let cluster = Cluster::start_with(1, &[("STORM_CLUSTER_KEY", key.to_string())]);
    let health = |role: &str, port: u16, key: &str| {
        let out = Command::new(STORMD)
            .env_clear()
            .env("STORM_ROLE", role)
            .env("STORM_LISTEN", format!("127.0.0.1:{port}"))
            .env("STORM_MANAGER", cluster.manager.addr.to_string())
            .env("STORM_CLUSTER_KEY", key)
            .args(["health", "--timeout-ms", "700"])
            .output()
            .expect("run stormd health");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, text) = health("manager", cluster.manager.addr.port(), key);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("manager healthy"), "{text}");
    let (code, text) = health("peer", cluster.peers[0].addr.port(), key);
    assert_eq!(code, Some(0), "{text}");
    // A keyed daemon does not answer an unsigned or wrongly signed ping.
    let (code, text) = health("manager", cluster.manager.addr.port(), "");
    assert_eq!(code, Some(1), "{text}");
    let (code, text) = health(
        "peer",
        cluster.peers[0].addr.port(),
        "another-key-0123456789abcdef0",
    );
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("cluster key"), "{text}");
    let unused = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (code, text) = health("manager", unused.local_addr().unwrap().port(), key);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no answer from"), "{text}");
}

/// `routing = "fingers"` on real processes: every record of details-1996 found across 8 peers
/// in fewer hops than the ring's size, also after a leave (peers routing with the new view).
#[test]
fn finger_routing_finds_every_record_in_few_hops() {
    let mut cluster = Cluster::start_with(8, &[("STORM_ROUTING", "fingers".to_string())]);
    let file = shared_data("details-1996.csv");
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    let v = cluster.verify(&file);
    assert_eq!(v["found"], DETAILS_1996_ROWS, "{v}");
    let mut hops = Vec::new();
    for key in [
        "5570068", "5556561", "5557188", "5554947", "5572688", "5573218",
    ] {
        let q = cluster.ctl_json(&["query", key]);
        hops.push(q["path"].as_array().map_or(0, |p| p.len()) - 1);
    }
    // Chord at n = 8: at most log2(8) + 1 hops to the owner, one more to a replica.
    assert!(hops.iter().all(|h| *h <= 5), "{hops:?}");
    // Per query, `--routing` overrides the cluster's: the walk from the same entry peer takes
    // at least as many hops, and in total more.
    let (mut walked, mut fingered) = (0, 0);
    for key in [
        "5570068", "5556561", "5557188", "5554947", "5572688", "5573218",
    ] {
        let len = |routing: &str| {
            let q = cluster.ctl_json(&["query", key, "--via", "peer-0", "--routing", routing]);
            assert_eq!(q["found"], true, "{q}");
            q["path"].as_array().map_or(0, |p| p.len())
        };
        let (w, f) = (len("walk"), len("fingers"));
        assert!(f <= w, "{key}: fingers {f} hops, walk {w}");
        walked += w;
        fingered += f;
    }
    assert!(
        fingered < walked,
        "fingers {fingered} hops in all, walk {walked}"
    );
    cluster.ctl_json(&["leave", "peer-3"]);
    cluster.peer("peer-3").wait(Duration::from_secs(30));
    cluster.wait_settled();
    let v = cluster.verify(&file);
    assert_eq!(v["found"], DETAILS_1996_ROWS, "{v}");
}

/// A query hop's ack is held back and sent with others (stop 26): walks round a ring of six
/// peer processes are still acknowledged long before a hop would be sent again, so no peer
/// retransmits hops or routes around a live neighbour. Were the held acks never sent, or sent
/// late, every hop would be retransmitted at least twice.
#[test]
fn walked_hops_are_acknowledged_in_time_though_their_acks_wait() {
    let cluster = Cluster::start(6);
    let file = shared_data("details-1996.csv");
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    cluster.wait_settled();
    let counts = |status: &Value, field: &str| -> u64 {
        status["peers"]
            .as_array()
            .map_or(0, |ps| ps.iter().filter_map(|p| p[field].as_u64()).sum())
    };
    let before = cluster.status();
    let mut hops = 0;
    for key in [
        "5570068", "5556561", "5557188", "5554947", "5572688", "5573218", "5537890", "5572628",
        "5555166", "5555929", "5573079", "5581775",
    ] {
        for via in ["peer-0", "peer-3"] {
            let q = cluster.ctl_json(&["query", key, "--via", via, "--routing", "walk"]);
            assert_eq!(q["found"], true, "{q}");
            hops += q["path"].as_array().map_or(0, |p| p.len()) as u64 - 1;
        }
    }
    // Held acks leave within 5 ms; let the last of them arrive.
    std::thread::sleep(Duration::from_millis(200));
    let after = cluster.status();
    let resent = counts(&after, "retransmits") - counts(&before, "retransmits");
    let repeated = counts(&after, "duplicates") - counts(&before, "duplicates");
    assert!(hops >= 24, "the walks took {hops} hops");
    // A stall of the machine may cost a retransmission now and then, never one per hop.
    assert!(
        resent * 4 <= hops && repeated * 4 <= hops,
        "{hops} hops: {resent} retransmitted, {repeated} duplicates received"
    );
}

/// `vnodes = 32` on real processes: even shares of details-1996 after setup, a join that takes
/// a little from every peer, every record found, with finger routing.
#[test]
fn virtual_nodes_keep_shares_even_and_spread_a_join() {
    let env = [
        ("STORM_VNODES", "32".to_string()),
        ("STORM_ROUTING", "fingers".to_string()),
    ];
    let mut cluster = Cluster::start_with(6, &env);
    let file = shared_data("details-1996.csv");
    cluster.ctl_json(&["setup"]);
    cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    let owned = |s: &Value| -> Vec<(String, u64)> {
        s["peers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| Some((p["name"].as_str()?.to_string(), p["owned"].as_u64()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let before = owned(&cluster.wait_settled());
    let mean = DETAILS_1996_ROWS as f64 / 6.0;
    let max = before.iter().map(|(_, n)| *n).max().unwrap_or(0) as f64;
    assert!(max / mean <= 1.15, "max/mean {:.3}: {before:?}", max / mean);
    cluster.add_peer("late");
    cluster.wait_for_peers(7);
    let after = owned(&cluster.wait_settled());
    let givers = before
        .iter()
        .filter(|(name, n)| after.iter().any(|(a, m)| a == name && m < n))
        .count();
    assert_eq!(
        givers, 6,
        "the joiner took from every peer: {before:?} -> {after:?}"
    );
    assert_eq!(records_total(&cluster.status()), DETAILS_1996_ROWS);
    assert_eq!(cluster.verify(&file)["found"], DETAILS_1996_ROWS);
}

/// `stormctl generate` makes a larger file from a real one (event ids shifted per pass); the
/// cluster stores and finds every generated record.
#[test]
fn a_generated_file_is_distributed_and_verified_whole() {
    let source = shared_data("details-1950.csv");
    let out = std::env::temp_dir().join(format!("stormdht-generated-{}.csv", std::process::id()));
    let gen_out = Command::new(STORMCTL)
        .args(["--json", "generate", "--records", "20000", "--from"])
        .arg(&source)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("stormctl generate");
    assert!(gen_out.status.success(), "{gen_out:?}");
    assert_eq!(parse_json(&gen_out)["records"], 20_000);
    let cluster = Cluster::start(4);
    cluster.ctl_json(&["setup"]);
    let d = cluster.ctl_json(&["distribute", "--file", out.to_str().unwrap()]);
    assert_eq!(
        (d["read"].as_u64(), d["stored"].as_u64()),
        (Some(20_000), Some(20_000)),
        "{d}"
    );
    let v = cluster.verify(&out);
    assert_eq!(v["found"], 20_000, "{v}");
    let _ = std::fs::remove_file(&out);
}

/// An event with more rows than one datagram holds (300 rows against 4,096-byte datagrams):
/// the peer's direct answer carries the rows that fit and says so, and stormctl asks the
/// manager, whose answer travels acknowledged, in fragments, with every row. `verify` finds
/// every key exact.
#[test]
fn an_event_with_more_rows_than_a_datagram_is_answered_whole() {
    let dir = std::env::temp_dir().join(format!("stormd-heavy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("heavy.csv");
    let mut csv = String::from("EVENT_ID,STATE,NARRATIVE\n");
    for r in 0..300 {
        csv.push_str(&format!("777,OHIO,row {r:03} {}\n", "x".repeat(40)));
    }
    for id in 1_000..1_050 {
        csv.push_str(&format!("{id},IOWA,one row\n"));
    }
    std::fs::write(&file, csv).unwrap();
    let cluster = Cluster::start_with(3, &[("STORM_MAX_DATAGRAM", "4096".to_string())]);
    cluster.ctl_json(&["setup"]);
    let d = cluster.ctl_json(&["distribute", "--file", file.to_str().unwrap()]);
    assert_eq!(d["stored"].as_u64(), Some(350), "{d}");
    let q = cluster.ctl_json(&["query", "777"]);
    assert_eq!(q["found"], true, "{q}");
    assert_eq!(q["records"].as_array().map(Vec::len), Some(300), "{q}");
    assert_eq!(q["truncated"], false, "{q}");
    let v = cluster.verify(&file);
    assert_eq!(
        (v["found"].as_u64(), v["mismatched"].as_u64()),
        (Some(51), Some(0)),
        "{v}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
