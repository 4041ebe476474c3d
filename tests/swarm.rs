//! The swarm test: the real image and deploy/swarm/stack.yml deployed with `docker stack deploy`
//! on a single-node swarm that the test creates (`docker swarm init --advertise-addr 127.0.0.1`)
//! and leaves again, with the host's `stormctl` talking to the manager's published UDP port.
//!
//! It needs a Docker engine that may join a swarm, so it is ignored by default; run it with
//! `cargo nextest run --test swarm --run-ignored only --no-capture`. It refuses to run (failing
//! with a message) on an engine that is already in a swarm: it never touches a swarm it did not
//! create. Everything it makes carries a unique name (stack, image tag, host port) and is removed
//! at the end, also when an assertion fails (`Swarm`'s `Drop`): the stack, the swarm itself
//! (`docker swarm leave --force`), the `docker_gwbridge` network if the swarm created it, and
//! the image tag. Jaeger is not deployed: the daemons log that they cannot export and carry on.

#[path = "support/docker.rs"]
mod docker;
use docker::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const STORMCTL: &str = env!("CARGO_BIN_EXE_stormctl");
const DATA_FILE: &str = "details-1996.csv";
const EXPECTED_RECORDS: u64 = 48_534;
/// The first row of details-1996.csv.
const KNOWN_EVENT: &str = "5570068";

#[test]
#[ignore = "needs a Docker engine that may join a swarm: run with just test-containers"]
fn swarm_stack_scales_and_loses_nothing() {
    let t0 = Instant::now();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    require_engine();
    let state = swarm_state();
    if state != "inactive" {
        panic!(
            "this Docker engine is already in a swarm (LocalNodeState {state:?}); the swarm test \
             only runs on an engine outside any swarm, and never touches one it did not create: \
             leave it first (docker swarm leave --force) or run the test on another engine"
        );
    }
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
    let mut swarm = Swarm {
        root: root.clone(),
        stack: format!("stormswarm{unique}"),
        tag: format!("stormdht-swarmtest:{unique}"),
        port: free_udp_port(),
        data_dir,
        joined: false,
        gwbridge_existed: network_exists("docker_gwbridge"),
        events: None,
        deaths: Arc::new(Mutex::new(Vec::new())),
        t0,
    };
    swarm.say(&format!(
        "stack {}, image {}, manager on udp 127.0.0.1:{}",
        swarm.stack, swarm.tag, swarm.port
    ));

    // The image, under a tag of its own (removed at the end): swarm does not build.
    assert!(
        !docker_ok(&["image", "inspect", &swarm.tag]),
        "image {} exists before the test",
        swarm.tag
    );
    swarm.say("building the image (deploy/build-image.sh)");
    let started = Instant::now();
    let build = run(
        Command::new("bash")
            .arg(root.join("deploy/build-image.sh"))
            .arg(&swarm.tag)
            .current_dir(&root),
        Duration::from_secs(45 * 60),
    );
    assert_ok(&build, "deploy/build-image.sh");
    swarm.say(&format!(
        "image built in {:.1} s",
        started.elapsed().as_secs_f64()
    ));

    // A single-node swarm of our own: from here on `Drop` leaves it.
    swarm.joined = true;
    let init = run(
        Command::new("docker").args(["swarm", "init", "--advertise-addr", "127.0.0.1"]),
        Duration::from_secs(120),
    );
    assert_ok(&init, "docker swarm init --advertise-addr 127.0.0.1");
    swarm.say("swarm initialised");
    swarm.watch_deaths();

    // Deploy: the manager and 5 peers.
    let up = Instant::now();
    let deploy = run(
        swarm.docker().args([
            "stack",
            "deploy",
            "--resolve-image",
            "never",
            "-c",
            "deploy/swarm/stack.yml",
            &swarm.stack,
        ]),
        Duration::from_secs(180),
    );
    assert_ok(&deploy, "docker stack deploy");
    swarm.say(&format!(
        "stack deployed in {:.2} s",
        up.elapsed().as_secs_f64()
    ));
    wait_for(Duration::from_secs(180), "5 registered peers", || {
        let s = swarm.status()?;
        let n = peers(&s).len();
        (n == 5)
            .then_some(())
            .ok_or(format!("{n} peer(s) registered: {}", summary(&s)))
    });
    let registered = up.elapsed();
    let setup = swarm.ctl_json(&["setup"], Duration::from_secs(60));
    assert_eq!(peers(&setup).len(), 5, "setup: {setup}");
    swarm.assert_members_are_the_tasks(&setup);
    swarm.say(&format!(
        "deploy -> 5 peers registered {:.2} s, ring formed {:.2} s",
        registered.as_secs_f64(),
        up.elapsed().as_secs_f64()
    ));

    // Distribute the whole year from the manager's read-only /data bind mount.
    let started = Instant::now();
    let d = swarm.ctl_json(
        &["distribute", "--file", &format!("/data/{DATA_FILE}")],
        Duration::from_secs(600),
    );
    assert_eq!(num(&d, "read"), EXPECTED_RECORDS, "distribute: {d}");
    assert_eq!(num(&d, "stored"), EXPECTED_RECORDS, "distribute: {d}");
    assert_eq!(num(&d, "rejected"), 0, "distribute: {d}");
    swarm.say(&format!(
        "distributed {EXPECTED_RECORDS} records in {:.2} s",
        started.elapsed().as_secs_f64()
    ));
    swarm.settled_ring(5, &BTreeSet::new());

    let q = swarm.ctl_json(&["query", KNOWN_EVENT], Duration::from_secs(30));
    assert_eq!(q["found"], Value::Bool(true), "query {KNOWN_EVENT}: {q}");
    assert_eq!(q["event_id"], KNOWN_EVENT, "query: {q}");
    let r = &q["records"][0];
    assert_eq!(
        (r["state"].as_str(), r["cz_name"].as_str()),
        (Some("ILLINOIS"), Some("HANCOCK")),
        "query {KNOWN_EVENT}: {q}"
    );
    swarm.say(&format!(
        "query {KNOWN_EVENT}: found in {} hop(s) via {}",
        q["hops"], q["path_names"]
    ));
    let v = swarm.verify(&host_csv);
    swarm.say(&format!("verify with 5 peers: all found in {v:.2} s"));

    // Down to 3: swarm stops two tasks with SIGTERM; they hand their records over and leave.
    let before = names(&swarm.status().expect("status"));
    let started = Instant::now();
    swarm.scale(3);
    let scaled = started.elapsed();
    let s = swarm.settled_ring(3, &BTreeSet::new());
    let after = names(&s);
    assert!(
        after.is_subset(&before),
        "scaling down added peers: {before:?} -> {after:?}"
    );
    let settled = started.elapsed();
    let v = swarm.verify(&host_csv);
    swarm.say(&format!(
        "scale 5 -> 3: docker service scale {:.2} s, settled {:.2} s, verify {v:.2} s",
        scaled.as_secs_f64(),
        settled.as_secs_f64()
    ));

    // Up to 6: three new tasks join the formed ring and take over their share.
    let started = Instant::now();
    swarm.scale(6);
    let scaled = started.elapsed();
    let s = swarm.settled_ring(6, &after);
    let settled = started.elapsed();
    for p in peers(&s) {
        if !after.contains(&name(p)) {
            swarm.say(&format!(
                "new peer {} holds {} records",
                name(p),
                count(p, "records")
            ));
        }
    }
    let v = swarm.verify(&host_csv);
    swarm.say(&format!(
        "scale 3 -> 6: docker service scale {:.2} s, settled {:.2} s, verify {v:.2} s",
        scaled.as_secs_f64(),
        settled.as_secs_f64()
    ));

    // Teardown: every peer exits 0, and swarm does not restart one (restart on-failure only);
    // the manager stays.
    let t = swarm.ctl_json(&["teardown"], Duration::from_secs(60));
    assert_eq!(num(&t, "peers"), 6, "teardown: {t}");
    let service = format!("{}_peer", swarm.stack);
    let tasks = wait_for(
        Duration::from_secs(90),
        "every peer task to complete",
        || {
            let lines = docker_out_lines(&[
                "service",
                "ps",
                "--no-trunc",
                "--format",
                "{{.Name}}|{{.DesiredState}}|{{.CurrentState}}|{{.Error}}",
                &service,
            ]);
            // Ended, and swarm's own view caught up: a task that completed less than a
            // second ago can still show desired state Running for a moment (seen once in
            // CI), which the check below would take for a restart.
            let done = lines
                .iter()
                .filter(|l| {
                    let f: Vec<&str> = l.split('|').collect();
                    f.len() >= 3 && f[1] != "Running" && !f[2].starts_with("Running")
                })
                .count();
            (lines.len() == 6 && done == 6)
                .then_some(lines.clone())
                .ok_or(format!("{} task(s): {lines:?}", lines.len()))
        },
    );
    swarm.say(&format!("after teardown: {tasks:?}"));
    for line in &tasks {
        let f: Vec<&str> = line.split('|').collect();
        assert!(
            f.len() == 4 && f[1] == "Shutdown" && f[2].starts_with("Complete") && f[3].is_empty(),
            "a peer task did not end with exit 0 (or swarm wants it running again): {line}"
        );
    }
    let manager = docker_out_lines(&[
        "service",
        "ps",
        "--format",
        "{{.CurrentState}}",
        "--filter",
        "desired-state=running",
        &format!("{}_manager", swarm.stack),
    ]);
    assert!(
        manager.len() == 1 && manager[0].starts_with("Running"),
        "the manager should stay up after teardown: {manager:?}"
    );
    swarm
        .status()
        .unwrap_or_else(|e| panic!("the manager does not answer after teardown: {e}"));

    // Every peer container that ever stopped, the two of the scale-down included, exited 0.
    let deaths = wait_for(
        Duration::from_secs(30),
        "8 peer container exits (2 on scale-down, 6 on teardown) in docker events",
        || {
            let d = swarm.peer_deaths();
            (d.len() >= 8).then_some(d.clone()).ok_or(format!("{d:?}"))
        },
    );
    swarm.say(&format!("peer exits (docker events): {deaths:?}"));
    assert_eq!(deaths.len(), 8, "{deaths:?}");
    for (name, code) in &deaths {
        assert_eq!(code, "0", "peer container {name} exited with {code}");
    }
    swarm.say("passed; cleaning up");
}

/// The stack under test, and the swarm made for it. Dropping it removes the stack, leaves the
/// swarm (`docker swarm leave --force`), and removes the test's image tag, whether the test
/// passed or not.
struct Swarm {
    root: PathBuf,
    stack: String,
    tag: String,
    port: u16,
    data_dir: PathBuf,
    /// Set just before `docker swarm init`: the node was outside any swarm before, so the swarm
    /// is ours to leave.
    joined: bool,
    /// Whether `docker_gwbridge` was there before the swarm (else it goes with it).
    gwbridge_existed: bool,
    /// `docker events` streaming the stack's container exits, ended by its id on drop.
    events: Option<Child>,
    /// (container name, exit code) of each peer container exit seen.
    deaths: Arc<Mutex<Vec<(String, String)>>>,
    t0: Instant,
}

impl Swarm {
    fn say(&self, what: &str) {
        println!("swarm: [{:7.2} s] {what}", self.t0.elapsed().as_secs_f64());
    }

    /// `docker` with the stack file's variables set (and no inherited ones).
    fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.current_dir(&self.root)
            .env("STORM_IMAGE", &self.tag)
            .env("STORM_PORT", self.port.to_string())
            .env("STORM_DATA_DIR", &self.data_dir)
            .env("STORM_DATA_FILE", DATA_FILE)
            .env("STORM_PEERS", "5")
            .env_remove("STORM_LOG")
            .env_remove("STORM_CLUSTER_KEY");
        cmd
    }

    /// Streams the stack's container exits (`docker events`) into `deaths`. The swarm reaps
    /// scaled-down tasks' containers and the engine keeps only its last 256 events (health checks
    /// fill them quickly), so the exits are collected as they happen.
    fn watch_deaths(&mut self) {
        let mut child = Command::new("docker")
            .args([
                "events",
                "--filter",
                "type=container",
                "--filter",
                "event=die",
                "--filter",
                &format!("label=com.docker.stack.namespace={}", self.stack),
                "--format",
                r#"{{index .Actor.Attributes "com.docker.swarm.service.name"}} {{.Actor.Attributes.name}} {{.Actor.Attributes.exitCode}}"#,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker events");
        let stdout = child.stdout.take().expect("docker events stdout");
        let peer = format!("{}_peer", self.stack);
        let deaths = Arc::clone(&self.deaths);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut f = line.split_whitespace();
                if f.next() == Some(peer.as_str()) {
                    let name = f.next().unwrap_or_default().to_string();
                    let code = f.next().unwrap_or_default().to_string();
                    deaths.lock().expect("deaths").push((name, code));
                }
            }
        });
        self.events = Some(child);
    }

    fn peer_deaths(&self) -> Vec<(String, String)> {
        self.deaths.lock().expect("deaths").clone()
    }

    /// `docker service scale <stack>_peer=N`, waiting for the service to converge.
    fn scale(&self, n: usize) {
        let out = run(
            Command::new("docker").args([
                "service",
                "scale",
                "--detach=false",
                &format!("{}_peer={n}", self.stack),
            ]),
            Duration::from_secs(300),
        );
        assert_ok(
            &out,
            &format!("docker service scale {}_peer={n}", self.stack),
        );
    }

    /// Ids of the running containers of the stack's peer service.
    fn peer_containers(&self) -> BTreeSet<String> {
        docker_out_lines(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.swarm.service.name={}_peer", self.stack),
        ])
        .into_iter()
        .collect()
    }

    /// A peer's name is its task's host name: the first 12 hex digits of its container id.
    fn task_names(&self) -> BTreeSet<String> {
        self.peer_containers()
            .iter()
            .map(|id| id.chars().take(12).collect())
            .collect()
    }

    fn assert_members_are_the_tasks(&self, status: &Value) {
        assert_eq!(
            names(status),
            self.task_names(),
            "ring members are not the peer tasks' containers"
        );
    }

    fn stormctl(&self, args: &[&str], reply_timeout: Duration) -> Command {
        let mut cmd = Command::new(STORMCTL);
        cmd.args(["--manager", &format!("127.0.0.1:{}", self.port), "--json"])
            .args(["--timeout", &reply_timeout.as_secs_f64().to_string()])
            .args(args)
            // Traffic stays on loopback: no trace export from the host-side client.
            .env_remove("STORM_TELEMETRY__OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("STORM_JAEGER_UI")
            .env_remove("STORMCTL_MANAGER")
            .env_remove("STORMCTL_KEY")
            .env_remove("STORMCTL_KEY_FILE");
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
        if !out.succeeded() {
            return Err(format!("stormctl status: {}", out.describe()));
        }
        serde_json::from_str(&out.stdout).map_err(|e| format!("status: {e}: {}", out.stdout))
    }

    /// Waits for a settled ring of `n` peers, all up, whose members are the running peer tasks,
    /// holding every record twice between them; peers not in `old` must hold some.
    fn settled_ring(&self, n: usize, old: &BTreeSet<String>) -> Value {
        let what = format!(
            "a settled ring of {n} peers (the running tasks) holding all {EXPECTED_RECORDS} records twice"
        );
        let started = Instant::now();
        let s = wait_for(Duration::from_secs(180), &what, || {
            let s = self.status()?;
            let ps = peers(&s);
            let total: u64 = ps.iter().map(|p| count(p, "owned")).sum();
            let copies: u64 = ps.iter().map(|p| count(p, "records")).sum();
            let fresh_empty = ps
                .iter()
                .filter(|p| !old.is_empty() && !old.contains(&name(p)) && count(p, "records") == 0)
                .count();
            let states: BTreeSet<&str> = ps.iter().filter_map(|p| p["state"].as_str()).collect();
            let tasks = self.task_names();
            let ok = ps.len() == n
                && s["settled"] == Value::Bool(true)
                && states == BTreeSet::from(["up"])
                && total == EXPECTED_RECORDS
                && copies == 2 * EXPECTED_RECORDS
                && s["under_replicated_ranges"].as_u64() == Some(0)
                && fresh_empty == 0
                && names(&s) == tasks;
            ok.then_some(s.clone()).ok_or(format!(
                "{}, {fresh_empty} new peer(s) without records, running tasks {tasks:?}",
                summary(&s)
            ))
        });
        self.say(&format!(
            "settled ring of {n} peers after {:.2} s: {}",
            started.elapsed().as_secs_f64(),
            summary(&s)
        ));
        s
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

    fn dump_logs(&self) {
        for service in ["manager", "peer"] {
            let service = format!("{}_{service}", self.stack);
            let ps = run(
                Command::new("docker").args(["service", "ps", "--no-trunc", &service]),
                Duration::from_secs(60),
            );
            let logs = run(
                Command::new("docker").args([
                    "service",
                    "logs",
                    "--no-trunc",
                    "--tail",
                    "40",
                    &service,
                ]),
                Duration::from_secs(60),
            );
            eprintln!(
                "swarm: the test failed; {service}'s tasks:\n{}{}\nits last log lines:\n{}{}",
                ps.stdout, ps.stderr, logs.stdout, logs.stderr
            );
        }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if self.joined {
            if thread::panicking() {
                self.dump_logs();
            }
            let label = format!("label=com.docker.stack.namespace={}", self.stack);
            let rm = run(
                Command::new("docker").args(["stack", "rm", &self.stack]),
                Duration::from_secs(120),
            );
            if !rm.succeeded() {
                eprintln!("swarm: cleanup: docker stack rm: {}", rm.describe());
            }
            // `stack rm` returns at once; the tasks stop in the background (a peer may use its
            // grace period if the manager went first).
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(90)
                && !docker_out_lines(&["ps", "-aq", "--filter", &label]).is_empty()
            {
                thread::sleep(Duration::from_millis(500));
            }
            let leave = run(
                Command::new("docker").args(["swarm", "leave", "--force"]),
                Duration::from_secs(120),
            );
            if !leave.succeeded() {
                eprintln!(
                    "swarm: cleanup: docker swarm leave --force: {}",
                    leave.describe()
                );
            }
            let left = docker_out_lines(&["ps", "-aq", "--filter", &label]);
            if !left.is_empty() {
                let args: Vec<&str> = ["rm", "-f"]
                    .into_iter()
                    .chain(left.iter().map(String::as_str))
                    .collect();
                let out = run(Command::new("docker").args(&args), Duration::from_secs(120));
                eprintln!(
                    "swarm: cleanup: docker {}: {}",
                    args.join(" "),
                    out.describe()
                );
            }
            if !self.gwbridge_existed && network_exists("docker_gwbridge") {
                let out = run(
                    Command::new("docker").args(["network", "rm", "docker_gwbridge"]),
                    Duration::from_secs(60),
                );
                if !out.succeeded() {
                    eprintln!(
                        "swarm: cleanup: docker network rm docker_gwbridge: {}",
                        out.describe()
                    );
                }
            }
            let state = swarm_state();
            if state == "inactive" {
                self.say(&format!("left the swarm; stack {} removed", self.stack));
            } else {
                eprintln!("swarm: cleanup: the node is still in a swarm: {state:?}");
            }
        }
        if let Some(mut events) = self.events.take() {
            let _ = events.kill();
            let _ = events.wait();
        }
        let rmi = run(
            Command::new("docker").args(["rmi", &self.tag]),
            Duration::from_secs(120),
        );
        if rmi.succeeded() {
            self.say(&format!("removed image {}", self.tag));
        } else if !rmi.stderr.contains("No such image") {
            eprintln!(
                "swarm: cleanup: docker rmi {}: {}",
                self.tag,
                rmi.describe()
            );
        }
    }
}

/// The engine's swarm membership: "inactive" outside any swarm.
fn swarm_state() -> String {
    let out = run(
        Command::new("docker").args(["info", "--format", "{{.Swarm.LocalNodeState}}"]),
        Duration::from_secs(60),
    );
    assert_ok(&out, "docker info");
    out.stdout.trim().to_string()
}

fn network_exists(name: &str) -> bool {
    docker_ok(&["network", "inspect", name])
}

fn docker_ok(args: &[&str]) -> bool {
    run(Command::new("docker").args(args), Duration::from_secs(60)).succeeded()
}

/// A UDP port free on every interface (host-mode publishing binds 0.0.0.0).
fn free_udp_port() -> u16 {
    let socket = UdpSocket::bind("0.0.0.0:0").expect("bind a UDP port");
    socket.local_addr().expect("local address").port()
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

/// A count that must be there.
fn num(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("`{key}` is not a count in {v}"))
}

/// A peer's count in a status; a peer only registered has none yet.
fn count(peer: &Value, key: &str) -> u64 {
    peer[key].as_u64().unwrap_or(0)
}

/// One line about a status, for progress and for the last state of a wait.
fn summary(s: &Value) -> String {
    let ps = peers(s);
    let owned: u64 = ps.iter().map(|p| count(p, "owned")).sum();
    let copies: u64 = ps.iter().map(|p| count(p, "records")).sum();
    let each: Vec<String> = ps
        .iter()
        .map(|p| {
            format!(
                "{} {} {}/{}",
                name(p),
                p["state"].as_str().unwrap_or("?"),
                count(p, "owned"),
                count(p, "records")
            )
        })
        .collect();
    format!(
        "epoch {}, settled {}, {} peer(s) [{}], {owned} records in {copies} copies, {} under-replicated range(s)",
        s["epoch"],
        s["settled"],
        ps.len(),
        each.join(", "),
        s["under_replicated_ranges"]
    )
}

fn docker_out_lines(args: &[&str]) -> Vec<String> {
    let out = run(Command::new("docker").args(args), Duration::from_secs(120));
    if !out.succeeded() {
        eprintln!("swarm: docker {}: {}", args.join(" "), out.describe());
    }
    out.stdout
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}
