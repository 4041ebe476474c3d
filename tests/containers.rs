//! The container test: the real image, the real compose file, a manager and peers in containers,
//! and the host's `stormctl` talking to the manager's published UDP port.
//!
//! It needs a Docker engine with Compose (`docker compose` or `docker-compose`), so it is ignored
//! by default; `just test-containers` runs it (`--run-ignored only`), and skips it, saying so,
//! when `STORM_SKIP_DOCKER=1`. Without an engine it fails with a message saying how to skip.
//!
//! Everything it makes carries a unique name (compose project, image tag, host port) and is
//! removed at the end, also when an assertion fails (`Cluster`'s `Drop`). Jaeger is not started:
//! the daemons log that they cannot export and carry on.

#[path = "support/docker.rs"]
mod docker;
use docker::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const STORMCTL: &str = env!("CARGO_BIN_EXE_stormctl");
const DATA_FILE: &str = "details-1996.csv";
const EXPECTED_RECORDS: u64 = 48_534;

#[test]
#[ignore = "needs a Docker engine: run with just test-containers"]
fn compose_cluster_scales_and_loses_nothing() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    require_engine();
    let compose = compose_command();
    let data_dir = root
        .join("../shared/data")
        .canonicalize()
        .unwrap_or_else(|e| {
            panic!("the test data directory ../shared/data (next to the project) is missing: {e}")
        });
    let host_csv = data_dir.join(DATA_FILE);
    assert!(host_csv.is_file(), "{} is missing", host_csv.display());

    let unique = format!(
        "{}{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_micros())
            .unwrap_or(0)
    );
    let cluster = Cluster {
        root: root.clone(),
        compose,
        project: format!("stormtest{unique}"),
        tag: format!("stormdht-test:{unique}"),
        port: free_udp_port(),
        data_dir,
        started: unix_now(),
        events: None,
    };
    let mut cluster = cluster;
    cluster.watch_peer_exits();
    println!(
        "containers: project {}, image {}, manager on udp 127.0.0.1:{}, compose: {}",
        cluster.project,
        cluster.tag,
        cluster.port,
        cluster.compose.join(" ")
    );

    // The image, under a tag of its own (removed at the end), built by compose itself from the
    // compose file's `build:` on the path for engines that cannot pull (host-built binaries).
    assert!(
        !Command::new("docker")
            .args(["image", "inspect", &cluster.tag])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "image {} exists before the test",
        cluster.tag
    );
    println!("containers: building the binaries (deploy/build-static.sh), then compose build");
    let started = Instant::now();
    let build = run(
        Command::new("bash")
            .arg(root.join("deploy/build-static.sh"))
            .current_dir(&root),
        Duration::from_secs(45 * 60),
    );
    assert_ok(&build, "deploy/build-static.sh");
    let build = run(
        cluster.compose().args(["build", "manager"]),
        Duration::from_secs(10 * 60),
    );
    assert_ok(&build, "compose build manager");
    let size = docker_out(&["image", "inspect", "-f", "{{.Size}}", &cluster.tag]);
    let size: u64 = size.trim().parse().expect("image size");
    println!(
        "containers: FIGURE image size {:.1} MB ({size} bytes), built in {:.1} s",
        size as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    // Up: the manager and 5 peers, no Jaeger.
    let up = Instant::now();
    cluster.scale(5);
    let status = wait_for(Duration::from_secs(60), "5 registered peers", || {
        let s = cluster.status()?;
        let n = peers(&s).len();
        (n == 5)
            .then_some(s)
            .ok_or(format!("{n} peer(s) registered"))
    });
    let registered = up.elapsed();
    cluster.assert_members_are_the_containers(&status);
    let setup = cluster.ctl_json(&["setup"], Duration::from_secs(60));
    assert_eq!(peers(&setup).len(), 5, "setup: {setup}");
    // The README's way: the image's own stormctl, inside the manager's container.
    let inside = run(
        cluster
            .compose()
            .args(["exec", "-T", "manager", "/stormctl", "--json", "status"]),
        Duration::from_secs(60),
    );
    assert_ok(&inside, "compose exec manager /stormctl status");
    let inside: Value = serde_json::from_str(inside.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "stormctl in the container printed no JSON ({e}): {}",
            inside.stdout
        )
    });
    assert_eq!(peers(&inside).len(), 5, "{inside}");
    println!(
        "containers: FIGURE up -> 5 peers registered {:.2} s; up -> ring formed (setup answered) {:.2} s",
        registered.as_secs_f64(),
        up.elapsed().as_secs_f64()
    );
    // The image's health check (`stormd health`) is what `docker ps` shows, and what the
    // peers' depends_on waited for.
    wait_for(Duration::from_secs(30), "every container healthy", || {
        let states: Vec<String> = ["manager", "peer"]
            .iter()
            .flat_map(|service| cluster.container_ids(service))
            .map(|id| {
                docker_out(&["inspect", "-f", "{{.State.Health.Status}}", &id])
                    .trim()
                    .to_string()
            })
            .collect();
        (states.len() == 6 && states.iter().all(|h| h == "healthy"))
            .then_some(())
            .ok_or(format!("{states:?}"))
    });

    // Distribute the whole year from the manager's read-only /data mount.
    let started = Instant::now();
    let d = cluster.ctl_json(
        &["distribute", "--file", &format!("/data/{DATA_FILE}")],
        Duration::from_secs(600),
    );
    assert_eq!(num(&d, "read"), EXPECTED_RECORDS, "distribute: {d}");
    assert_eq!(num(&d, "stored"), EXPECTED_RECORDS, "distribute: {d}");
    assert_eq!(num(&d, "rejected"), 0, "distribute: {d}");
    println!(
        "containers: distributed {EXPECTED_RECORDS} records in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    cluster.settled_ring(5, &BTreeSet::new());
    let v = cluster.verify(&host_csv);
    println!("containers: FIGURE verify with 5 peers {v:.2} s");

    // Down to 3: compose stops two peers with SIGTERM; they hand their records over and leave.
    let before: BTreeSet<String> = names(&cluster.status().expect("status"));
    let started = Instant::now();
    cluster.scale(3);
    let scaled = started.elapsed();
    let s = cluster.settled_ring(3, &BTreeSet::new());
    let after = names(&s);
    assert!(
        after.is_subset(&before),
        "scaling down added peers: {before:?} -> {after:?}"
    );
    let v = cluster.verify(&host_csv);
    println!(
        "containers: FIGURE scale 5 -> 3: compose {:.2} s, verify {v:.2} s, scale -> verified {:.2} s",
        scaled.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // Up to 6: three new peers join the formed ring and take over their share.
    let started = Instant::now();
    cluster.scale(6);
    let scaled = started.elapsed();
    let s = cluster.settled_ring(6, &after);
    let ready = started.elapsed();
    for p in peers(&s) {
        if !after.contains(&name(p)) {
            println!(
                "containers: new peer {} holds {} records",
                name(p),
                num(p, "records")
            );
        }
    }
    let v = cluster.verify(&host_csv);
    println!(
        "containers: FIGURE scale 3 -> 6: compose {:.2} s, new peers hold records {:.2} s, verify {v:.2} s, scale -> verified {:.2} s",
        scaled.as_secs_f64(),
        ready.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // `docker kill` of a peer container: declared dead, its ranges repaired from their other
    // copies, nothing lost.
    let victim = cluster.container_ids("peer")[0].clone();
    let victim_name: String = victim.chars().take(12).collect();
    let started = Instant::now();
    docker_out(&["kill", &victim]);
    wait_for(
        Duration::from_secs(60),
        "the killed peer dead, the ring repaired",
        || {
            let s = cluster.status()?;
            let ps = peers(&s);
            let dead = ps
                .iter()
                .any(|p| name(p) == victim_name && p["state"] == "dead");
            let live: Vec<&&Value> = ps.iter().filter(|p| p["state"] == "up").collect();
            all_reported(live.iter().map(|p| **p))?;
            let owned: u64 = live.iter().map(|p| num(p, "owned")).sum();
            let copies: u64 = live.iter().map(|p| num(p, "records")).sum();
            let ok = dead
                && live.len() == 5
                && s["settled"] == Value::Bool(true)
                && owned == EXPECTED_RECORDS
                && copies == 2 * EXPECTED_RECORDS
                && num(&s, "under_replicated_ranges") == 0;
            ok.then_some(()).ok_or(format!(
                "dead {dead}, {} up, {owned} records in {copies} copies",
                live.len()
            ))
        },
    );
    let repaired = started.elapsed();
    let v = cluster.verify(&host_csv);
    println!(
        "containers: FIGURE docker kill of a peer -> dead and fully replicated {:.2} s, verify {v:.2} s",
        repaired.as_secs_f64()
    );

    // `docker kill` of the manager, then `docker start`: the peers bring the ring back.
    let manager = cluster.container_ids("manager");
    docker_out(&["kill", &manager[0]]);
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    docker_out(&["start", &manager[0]]);
    wait_for(
        Duration::from_secs(60),
        "the restarted manager's ring",
        || {
            let s = cluster.status()?;
            let live: Vec<&Value> = peers(&s)
                .into_iter()
                .filter(|p| p["state"] == "up")
                .collect();
            all_reported(live.iter().copied())?;
            let owned: u64 = live.iter().map(|p| num(p, "owned")).sum();
            (live.len() == 5 && s["settled"] == Value::Bool(true) && owned == EXPECTED_RECORDS)
                .then_some(())
                .ok_or(format!("{} up, {owned} records", live.len()))
        },
    );
    let back = started.elapsed();
    let v = cluster.verify(&host_csv);
    println!(
        "containers: FIGURE docker kill + start of the manager -> ring back {:.2} s, verify {v:.2} s",
        back.as_secs_f64()
    );

    // The killed peer's container started again: it joins under its old name.
    docker_out(&["start", &victim]);
    cluster.settled_ring(6, &BTreeSet::new());

    // Teardown: every peer exits 0; the manager stays.
    let t = cluster.ctl_json(&["teardown"], Duration::from_secs(60));
    assert_eq!(num(&t, "peers"), 6, "teardown: {t}");
    let exits = wait_for(
        Duration::from_secs(60),
        "every peer container to exit",
        || {
            let ids = cluster.container_ids("peer");
            let states = docker_out_lines(
                &[
                    &[
                        "inspect",
                        "-f",
                        "{{.Name}} {{.State.Status}} {{.State.ExitCode}}",
                    ][..],
                    &ids.iter().map(String::as_str).collect::<Vec<_>>()[..],
                ]
                .concat(),
            );
            let running = states.iter().filter(|l| !l.contains(" exited ")).count();
            (ids.len() == 6 && running == 0)
                .then_some(states.clone())
                .ok_or(format!("{} container(s): {states:?}", ids.len()))
        },
    );
    for line in &exits {
        assert!(
            line.ends_with(" exited 0"),
            "a peer did not exit with 0: {line}"
        );
    }
    println!("containers: after teardown: {exits:?}");
    let manager = cluster.container_ids("manager");
    assert_eq!(manager.len(), 1, "manager containers: {manager:?}");
    let state = docker_out(&["inspect", "-f", "{{.State.Status}}", &manager[0]]);
    assert_eq!(
        state.trim(),
        "running",
        "the manager should stay up after teardown"
    );
    cluster
        .status()
        .unwrap_or_else(|e| panic!("the manager does not answer after teardown: {e}"));

    // Every peer that ever ran, including the two removed by the scale-down, exited with 0,
    // but for the one killed (137).
    let deaths = cluster.peer_exit_events();
    println!("containers: peer exits (docker events): {deaths:?}");
    assert_eq!(
        deaths.len(),
        9,
        "expected 9 peer exits (2 on scale-down, 1 killed, 6 on teardown): {deaths:?}"
    );
    let killed = deaths.iter().filter(|(_, code)| code == "137").count();
    assert_eq!(killed, 1, "{deaths:?}");
    for (name, code) in deaths.iter().filter(|(_, code)| code != "137") {
        assert_eq!(code, "0", "peer container {name} exited with {code}");
    }
}

/// The compose project under test. Dropping it removes the containers, network, volumes and the
/// test's image tag, whether the test passed or not.
struct Cluster {
    root: PathBuf,
    compose: Vec<String>,
    project: String,
    tag: String,
    port: u16,
    data_dir: PathBuf,
    /// Unix seconds at the start, for `docker events --since`.
    started: u64,
    /// `docker events` streaming peer exits from the start: the daemon keeps only its last 256
    /// events, and health checks alone make dozens a minute, so asking at the end loses some.
    events: Option<(std::process::Child, std::sync::mpsc::Receiver<String>)>,
}

impl Cluster {
    fn compose(&self) -> Command {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .arg("-f")
            .arg(self.root.join("docker-compose.yml"))
            .args(["-p", &self.project])
            .current_dir(&self.root)
            .env("STORM_IMAGE", &self.tag)
            .env("STORM_PORT", self.port.to_string())
            .env("STORM_DATA_DIR", &self.data_dir)
            .env("STORM_DATA_FILE", DATA_FILE)
            .env("STORM_DOCKERFILE", "deploy/Dockerfile.prebuilt")
            .env_remove("COMPOSE_FILE")
            .env_remove("COMPOSE_PROJECT_NAME");
        cmd
    }

    /// `up -d --scale peer=N manager peer` (never jaeger).
    fn scale(&self, n: usize) {
        let out = run(
            self.compose().args([
                "up",
                "-d",
                "--scale",
                &format!("peer={n}"),
                "manager",
                "peer",
            ]),
            Duration::from_secs(180),
        );
        assert_ok(&out, &format!("compose up --scale peer={n}"));
    }

    fn container_ids(&self, service: &str) -> Vec<String> {
        docker_out_lines(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ])
    }

    fn stormctl(&self, args: &[&str], reply_timeout: Duration) -> Command {
        let mut cmd = Command::new(STORMCTL);
        cmd.args(["--manager", &format!("127.0.0.1:{}", self.port), "--json"])
            .args(["--timeout", &reply_timeout.as_secs_f64().to_string()])
            .args(args)
            // Traffic stays on loopback: no trace export from the host-side client.
            .env_remove("STORM_TELEMETRY__OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("STORM_JAEGER_UI");
        cmd
    }

    /// Runs stormctl and parses its JSON answer; panics unless it exits 0.
    fn ctl_json(&self, args: &[&str], timeout: Duration) -> Value {
        let out = run(&mut self.stormctl(args, timeout), timeout + timeout / 2);
        assert_ok(&out, &format!("stormctl {}", args.join(" ")));
        parse(&out.stdout, args)
    }

    fn status(&self) -> Result<Value, String> {
        let out = run(
            &mut self.stormctl(&["status"], Duration::from_secs(2)),
            Duration::from_secs(30),
        );
        if out.timed_out || !out.status.is_some_and(|s| s.success()) {
            return Err(format!("stormctl status: {}", out.describe()));
        }
        serde_json::from_str(&out.stdout).map_err(|e| format!("status: {e}: {}", out.stdout))
    }

    /// Waits for a settled ring of `n` peers, all up, whose members are the running peer
    /// containers, holding every record between them; peers not in `old` must hold some.
    fn settled_ring(&self, n: usize, old: &BTreeSet<String>) -> Value {
        let what = format!("a settled ring of {n} peers holding all {EXPECTED_RECORDS} records");
        let s = wait_for(Duration::from_secs(120), &what, || {
            let s = self.status()?;
            let ps = peers(&s);
            // A peer that did not answer this status's probe in time (a busy machine) has no
            // counts: not settled yet, ask again.
            all_reported(ps.iter().copied())?;
            // Distinct records: the rows each peer owns (its replica rows are copies).
            let total: u64 = ps.iter().map(|p| num(p, "owned")).sum();
            let copies: u64 = ps.iter().map(|p| num(p, "records")).sum();
            let fresh_empty = ps
                .iter()
                .filter(|p| !old.is_empty() && !old.contains(&name(p)) && num(p, "records") == 0)
                .count();
            let states: BTreeSet<&str> = ps.iter().filter_map(|p| p["state"].as_str()).collect();
            let ok = ps.len() == n
                && s["settled"] == Value::Bool(true)
                && states == BTreeSet::from(["up"])
                && total == EXPECTED_RECORDS
                && copies == 2 * EXPECTED_RECORDS
                && num(&s, "under_replicated_ranges") == 0
                && fresh_empty == 0;
            ok.then_some(s.clone()).ok_or(format!(
                "{} peer(s), settled {}, states {states:?}, {total} records in {copies} copies, {fresh_empty} new peer(s) without records",
                ps.len(),
                s["settled"]
            ))
        });
        self.assert_members_are_the_containers(&s);
        s
    }

    /// A peer's name is its container's host name: the first 12 hex digits of the id.
    fn assert_members_are_the_containers(&self, status: &Value) {
        let containers: BTreeSet<String> = self
            .container_ids("peer")
            .iter()
            .map(|id| id.chars().take(12).collect())
            .collect();
        assert_eq!(
            names(status),
            containers,
            "ring members are not the peer containers"
        );
    }

    /// `stormctl verify` of the host's copy of the file; returns its duration in seconds.
    fn verify(&self, host_csv: &Path) -> f64 {
        let file = host_csv.to_string_lossy().into_owned();
        let args = ["verify", "--file", &file];
        let started = Instant::now();
        let out = run(
            &mut self.stormctl(&args, Duration::from_secs(30)),
            Duration::from_secs(900),
        );
        let secs = started.elapsed().as_secs_f64();
        let v = parse(&out.stdout, &args);
        for key in ["missing", "mismatched", "errors"] {
            assert_eq!(num(&v, key), 0, "verify: {key}: {v}");
        }
        assert_eq!(num(&v, "keys"), EXPECTED_RECORDS, "verify: {v}");
        assert_eq!(num(&v, "found"), EXPECTED_RECORDS, "verify: {v}");
        assert_ok(&out, "stormctl verify");
        secs
    }

    /// (container name, exit code) of every peer container that died since the test started.
    fn watch_peer_exits(&mut self) {
        let mut child = Command::new("docker")
            .args([
                "events",
                "--since",
                &self.started.saturating_sub(2).to_string(),
                "--filter",
                "type=container",
                "--filter",
                "event=die",
                "--filter",
                &format!("label=com.docker.compose.project={}", self.project),
                "--format",
                r#"{{index .Actor.Attributes "com.docker.compose.service"}} {{.Actor.Attributes.name}} {{.Actor.Attributes.exitCode}}"#,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker events");
        let stdout = child.stdout.take().expect("docker events stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        self.events = Some((child, rx));
    }

    /// (container name, exit code) of every peer container that ended since the start.
    fn peer_exit_events(&mut self) -> Vec<(String, String)> {
        // Events arrive a moment after the fact.
        thread::sleep(Duration::from_secs(1));
        let Some((_, rx)) = &self.events else {
            return Vec::new();
        };
        rx.try_iter()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some("peer")).then(|| {
                    let name = f.next().unwrap_or_default().to_string();
                    (name, f.next().unwrap_or_default().to_string())
                })
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((mut child, _)) = self.events.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if thread::panicking() {
            let logs = run(
                self.compose().args(["logs", "--no-color", "--tail", "40"]),
                Duration::from_secs(60),
            );
            eprintln!(
                "containers: the test failed; the cluster's last log lines:\n{}{}",
                logs.stdout, logs.stderr
            );
        }
        let down = run(
            self.compose()
                .args(["down", "-v", "--remove-orphans", "-t", "30"]),
            Duration::from_secs(300),
        );
        if !down.succeeded() {
            eprintln!("containers: cleanup: compose down: {}", down.describe());
        }
        // Whatever compose left behind (e.g. it was interrupted).
        let label = format!("label=com.docker.compose.project={}", self.project);
        for (list, rm) in [
            (&["ps", "-aq", "--filter", &label][..], &["rm", "-f"][..]),
            (
                &["network", "ls", "-q", "--filter", &label][..],
                &["network", "rm"][..],
            ),
            (
                &["volume", "ls", "-q", "--filter", &label][..],
                &["volume", "rm", "-f"][..],
            ),
        ] {
            let ids = docker_out_lines(list);
            if !ids.is_empty() {
                let args: Vec<&str> = rm
                    .iter()
                    .copied()
                    .chain(ids.iter().map(String::as_str))
                    .collect();
                let out = run(Command::new("docker").args(&args), Duration::from_secs(120));
                eprintln!(
                    "containers: cleanup: docker {}: {}",
                    args.join(" "),
                    out.describe()
                );
            }
        }
        let rmi = run(
            Command::new("docker").args(["rmi", &self.tag]),
            Duration::from_secs(120),
        );
        if rmi.succeeded() {
            println!(
                "containers: cleaned up project {} and image {}",
                self.project, self.tag
            );
        } else if !rmi.stderr.contains("No such image") {
            eprintln!(
                "containers: cleanup: docker rmi {}: {}",
                self.tag,
                rmi.describe()
            );
        }
    }
}

/// `docker compose` if the plugin is there, else `docker-compose`.
fn compose_command() -> Vec<String> {
    let v2 = run(
        Command::new("docker").args(["compose", "version"]),
        Duration::from_secs(30),
    );
    if v2.succeeded() {
        return vec!["docker".into(), "compose".into()];
    }
    let v1 = run(
        Command::new("docker-compose").arg("version"),
        Duration::from_secs(30),
    );
    assert!(
        v1.succeeded(),
        "neither `docker compose` nor `docker-compose` works: {}; install one, or set STORM_SKIP_DOCKER=1 to skip the container tests",
        v1.describe()
    );
    vec!["docker-compose".into()]
}

fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port on loopback");
    socket.local_addr().expect("local address").port()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn parse(stdout: &str, args: &[&str]) -> Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'));
    serde_json::from_str(line.unwrap_or(""))
        .unwrap_or_else(|e| panic!("stormctl {}: not JSON ({e}): {stdout}", args.join(" ")))
}

fn peers(status: &Value) -> Vec<&Value> {
    status["peers"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn name(peer: &Value) -> String {
    peer["name"].as_str().unwrap_or_default().to_string()
}

fn names(status: &Value) -> BTreeSet<String> {
    peers(status).into_iter().map(name).collect()
}

/// A peer that did not answer a status's probe in time (a busy machine) has no counts: that
/// status is not an answer yet, ask again.
fn all_reported<'a>(mut ps: impl Iterator<Item = &'a Value>) -> Result<(), String> {
    match ps.find(|p| p["records"].as_u64().is_none() || p["owned"].as_u64().is_none()) {
        Some(p) => Err(format!("peer {} did not report its counts", name(p))),
        None => Ok(()),
    }
}

fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a count in {v}"))
}

fn docker_out(args: &[&str]) -> String {
    let out = run(Command::new("docker").args(args), Duration::from_secs(120));
    assert_ok(&out, &format!("docker {}", args.join(" ")));
    out.stdout
}

fn docker_out_lines(args: &[&str]) -> Vec<String> {
    let out = run(Command::new("docker").args(args), Duration::from_secs(120));
    if !out.succeeded() {
        eprintln!("containers: docker {}: {}", args.join(" "), out.describe());
    }
    out.stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}
