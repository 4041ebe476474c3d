//! Test harness: real `stormd` processes on loopback, driven with the real `stormctl`.
#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const STORMD: &str = env!("CARGO_BIN_EXE_stormd");
pub const STORMCTL: &str = env!("CARGO_BIN_EXE_stormctl");

/// A real NOAA file of ../shared/data; its absence fails the test at once, naming the path.
pub fn shared_data(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data")
        .join(name);
    assert!(
        p.is_file(),
        "{} is missing: the tests read the real NOAA files from ../shared/data beside the project",
        p.display()
    );
    p
}

/// A running stormd process; killed on drop if still running.
pub struct Daemon {
    pub name: String,
    pub addr: SocketAddr,
    child: Child,
    stderr: mpsc::Receiver<String>,
    pub stderr_lines: Vec<String>,
}

impl Daemon {
    /// Starts stormd with `env` and waits for its "listening on" line.
    pub fn start(name: &str, env: &[(&str, String)]) -> Daemon {
        let mut cmd = Command::new(STORMD);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn stormd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = child.stderr.take().expect("stderr");
        let (etx, erx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = etx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                let errs: Vec<String> = erx.try_iter().collect();
                panic!(
                    "{name} did not report its address; stderr:\n{}",
                    errs.join("\n")
                )
            });
        let addr = line
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from {name}: {line}"));
        Daemon {
            name: name.to_string(),
            addr,
            child,
            stderr: erx,
            stderr_lines: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "kill -{sig} {}",
            self.pid()
        );
    }

    /// Sends `sig` and returns the exit code, if the process ends within 10 s.
    pub fn stop(&mut self, sig: &str) -> Option<i32> {
        self.signal(sig);
        self.wait(Duration::from_secs(10)).and_then(|s| s.code())
    }

    /// Waits for the process to end; None if it is still running after `limit`.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.drain_stderr();
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn drain_stderr(&mut self) -> &[String] {
        self.stderr_lines.extend(self.stderr.try_iter());
        &self.stderr_lines
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failed test shows what each process said last: the log is the only witness of a
        // timing-dependent failure on a busy CI machine.
        if std::thread::panicking() {
            std::thread::sleep(Duration::from_millis(50));
            self.drain_stderr();
            let lines = &self.stderr_lines;
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("--- last {} stderr lines of {} ---", tail.len(), self.name);
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

/// A manager and peers as separate processes.
pub struct Cluster {
    pub manager: Daemon,
    pub peers: Vec<Daemon>,
    pub extra_env: Vec<(&'static str, String)>,
    /// Variables for every stormctl run (e.g. STORMCTL_KEY).
    pub ctl_env: Vec<(&'static str, String)>,
}

impl Cluster {
    pub fn start(peers: usize) -> Cluster {
        Self::start_with(peers, &[])
    }

    pub fn start_with(peers: usize, extra: &[(&'static str, String)]) -> Cluster {
        let mut env = vec![
            ("STORM_ROLE", "manager".to_string()),
            ("STORM_LISTEN", "127.0.0.1:0".to_string()),
            // A loaded CI machine can be slow to schedule six processes: do not call a peer
            // unreachable in `status` too early.
            ("STORM_PROBE_TIMEOUT_MS", "3000".to_string()),
        ];
        env.extend(extra.iter().cloned());
        let manager = Daemon::start("manager", &env);
        let mut cluster = Cluster {
            manager,
            peers: Vec::new(),
            extra_env: extra.to_vec(),
            ctl_env: extra
                .iter()
                .filter(|(k, _)| *k == "STORM_CLUSTER_KEY")
                .map(|(_, v)| ("STORMCTL_KEY", v.clone()))
                .collect(),
        };
        for i in 0..peers {
            cluster.add_peer(&format!("peer-{i}"));
        }
        cluster.wait_for_peers(peers);
        cluster
    }

    pub fn peer_env(&self, name: &str) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("STORM_ROLE", "peer".to_string()),
            ("STORM_NAME", name.to_string()),
            ("STORM_LISTEN", "127.0.0.1:0".to_string()),
            ("STORM_MANAGER", self.manager.addr.to_string()),
        ];
        env.extend(self.extra_env.iter().cloned());
        env
    }

    pub fn add_peer(&mut self, name: &str) {
        let env = self.peer_env(name);
        self.peers.push(Daemon::start(name, &env));
    }

    pub fn peer(&mut self, name: &str) -> &mut Daemon {
        self.peers
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no peer {name}"))
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl_at_with(&self.manager.addr.to_string(), args, &self.ctl_env)
    }

    /// Runs stormctl with --json and parses its output; panics unless it exits 0.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let out = self.ctl(&[&["--json"], args].concat());
        assert!(
            out.status.success(),
            "stormctl {args:?} failed ({:?}):\n{}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        parse_json(&out)
    }

    pub fn status(&self) -> Value {
        self.ctl_json(&["status"])
    }

    pub fn wait_for_peers(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.status();
            if s["peers"].as_array().is_some_and(|p| p.len() == n) {
                return;
            }
            assert!(Instant::now() < deadline, "{n} peers did not register: {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the ring is settled (no hand-off under way).
    pub fn wait_settled(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status();
            if s["settled"] == Value::Bool(true) {
                return s;
            }
            assert!(Instant::now() < deadline, "the ring did not settle: {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn verify(&self, file: &std::path::Path) -> Value {
        self.verify_window(file, 64)
    }

    /// Verify with `window` queries in flight (a lossy network wants many: each query waits
    /// out its retransmissions).
    pub fn verify_window(&self, file: &std::path::Path, window: usize) -> Value {
        let window = window.to_string();
        let out = self.ctl(&[
            "--json",
            // A query that meets a dead peer before it is detected waits out its
            // retransmissions: give the answer time to come.
            "--timeout",
            "90",
            "verify",
            "--file",
            file.to_str().unwrap_or_default(),
            "--window",
            &window,
        ]);
        let v = parse_json(&out);
        assert!(
            out.status.success(),
            "verify failed: {v}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        v
    }
}

pub fn ctl_at(manager: &str, args: &[&str]) -> Output {
    ctl_at_with(manager, args, &[])
}

pub fn ctl_at_with(manager: &str, args: &[&str], env: &[(&str, String)]) -> Output {
    Command::new(STORMCTL)
        .arg("--manager")
        .arg(manager)
        .args(args)
        // The test decides whether stormctl holds a key, not the environment it runs in.
        .env_remove("STORMCTL_KEY")
        .env_remove("STORMCTL_KEY_FILE")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .stdin(Stdio::null())
        .output()
        .expect("run stormctl")
}

pub fn parse_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "stormctl printed no JSON ({e}):\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Distinct records in the cluster: the rows each peer owns (replicas not counted).
pub fn records_total(status: &Value) -> u64 {
    status["peers"]
        .as_array()
        .map_or(0, |ps| ps.iter().filter_map(|p| p["owned"].as_u64()).sum())
}

/// Every row held by the peers, copies included.
pub fn copies_total(status: &Value) -> u64 {
    status["peers"].as_array().map_or(0, |ps| {
        ps.iter().filter_map(|p| p["records"].as_u64()).sum()
    })
}

/// Waits until the ring is settled with every range at its full count of copies and no
/// copy under way, and `records` distinct records; returns that status.
pub fn wait_replicated(cluster: &Cluster, records: u64, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let s = cluster.status();
        let r = s["replication"].as_u64().unwrap_or(1);
        let done = s["settled"] == Value::Bool(true)
            && s["under_replicated_ranges"] == 0
            && s["repairing"] == 0
            && records_total(&s) == records
            && copies_total(&s) == r * records;
        if done {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "not fully replicated after {limit:?}: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub mod otlp;

/// The peers' names in a status, sorted: peers register concurrently, so their ids (and the
/// order of `status`) vary from run to run.
pub fn peer_names(status: &Value) -> Vec<String> {
    let mut names: Vec<String> = status["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str().map(String::from))
        .collect();
    names.sort_unstable();
    names
}
