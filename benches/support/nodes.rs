//! The nodes a scenario runs on: a manager and peers as separate `stormd` processes (the
//! harness of tests/support), or, where the machine cannot hold that many processes, the
//! library's in-process `LocalCluster` (manager and peers as tokio tasks of this process, each
//! on its own loopback UDP socket). Either way `stormctl` talks to the manager over UDP.

use crate::support::{Cluster, ctl_at, parse_json};
use serde_json::Value;
use std::time::{Duration, Instant};
use stormdht::cluster::LocalCluster;
use stormdht::config::Config;

pub enum Nodes {
    Processes(Cluster),
    /// Dropped with the runtime that runs its tasks (the bench makes one per scenario).
    InProcess(Box<LocalCluster>),
}

pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `kB` field of `/proc/<pid>/status` (0 when the process or the field is gone).
fn status_kib(pid: u32, field: &str) -> u64 {
    proc_kib(pid, "status", field)
}

/// A `kB` field of `/proc/<pid>/<file>` (0 when the process, the file or the field is gone).
fn proc_kib(pid: u32, file: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(field))?.to_string();
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

impl Nodes {
    /// A manager and `peers` peer processes, with `env` for every one of them.
    pub fn processes(peers: usize, env: &[(&'static str, String)]) -> Nodes {
        Nodes::Processes(Cluster::start_with(peers, env))
    }

    pub async fn in_process(peers: usize, base: &Config) -> Nodes {
        let cluster = LocalCluster::start(base, peers, "peer")
            .await
            .expect("in-process cluster");
        Nodes::InProcess(Box::new(cluster))
    }

    pub fn is_processes(&self) -> bool {
        matches!(self, Nodes::Processes(_))
    }

    pub fn manager(&self) -> String {
        match self {
            Nodes::Processes(c) => c.manager.addr.to_string(),
            Nodes::InProcess(c) => c.manager.to_string(),
        }
    }

    /// `stormctl --json ARGS` against the manager; panics unless it exits 0.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let out = ctl_at(&self.manager(), &[&["--json"], args].concat());
        assert!(
            out.status.success(),
            "stormctl {args:?} failed ({:?}):\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        parse_json(&out)
    }

    pub fn status(&self) -> Value {
        self.ctl_json(&["status"])
    }

    /// RSS of every process of the cluster (manager and peers), KiB. In process: this
    /// process's, which holds the manager and every peer (and the bench: compare deltas only).
    pub fn rss_kib(&self) -> u64 {
        match self {
            Nodes::Processes(c) => {
                rss_kib(c.manager.pid()) + c.peers.iter().map(|p| rss_kib(p.pid())).sum::<u64>()
            }
            Nodes::InProcess(_) => rss_kib(std::process::id()),
        }
    }

    /// The peers' private memory (`RssAnon`: heap, stacks, anonymous maps), without the
    /// pages of the binary's code, which every process counts in its RSS although they are
    /// one copy in memory. None for in-process peers.
    pub fn peers_private_kib(&self) -> Option<u64> {
        match self {
            Nodes::Processes(c) => Some(
                c.peers
                    .iter()
                    .map(|p| status_kib(p.pid(), "RssAnon:"))
                    .sum(),
            ),
            Nodes::InProcess(_) => None,
        }
    }

    /// The peers' proportional set size (`Pss` of `/proc/<pid>/smaps_rollup`): each page
    /// divided by the number of processes that map it, so summed over the peers a page of
    /// the binary's code that all of them fault in counts once, as it is held once, where
    /// their RSS counts it once per process. The memory all peers hold together. None for
    /// in-process peers, or where the kernel has no `smaps_rollup` (before 4.14).
    pub fn peers_pss_kib(&self) -> Option<u64> {
        match self {
            Nodes::Processes(c) => {
                let pss: Vec<u64> = c
                    .peers
                    .iter()
                    .map(|p| proc_kib(p.pid(), "smaps_rollup", "Pss:"))
                    .collect();
                pss.iter().all(|kib| *kib > 0).then(|| pss.iter().sum())
            }
            Nodes::InProcess(_) => None,
        }
    }

    /// The process ids of the manager and every peer; None for in-process nodes.
    pub fn pids(&self) -> Option<Vec<u32>> {
        match self {
            Nodes::Processes(c) => Some(
                std::iter::once(c.manager.pid())
                    .chain(c.peers.iter().map(|p| p.pid()))
                    .collect(),
            ),
            Nodes::InProcess(_) => None,
        }
    }

    pub fn manager_rss_kib(&self) -> Option<u64> {
        match self {
            Nodes::Processes(c) => Some(rss_kib(c.manager.pid())),
            Nodes::InProcess(_) => None,
        }
    }

    pub async fn add_peer(&mut self, name: &str) {
        match self {
            Nodes::Processes(c) => c.add_peer(name),
            Nodes::InProcess(c) => c.add_peer(name).await.expect("in-process peer"),
        }
    }

    /// Waits until the manager lists `n` peers.
    pub fn wait_for_peers(&self, n: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.status();
            if s["peers"].as_array().is_some_and(|p| p.len() == n) {
                return;
            }
            assert!(Instant::now() < deadline, "{n} peers did not register");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A graceful leave (its rows handed over first); returns once the peer has exited.
    pub async fn leave(&mut self, name: &str, limit: Duration) {
        match self {
            Nodes::Processes(c) => {
                c.ctl_json(&["leave", name]);
                assert!(
                    c.peer(name).wait(limit).is_some(),
                    "{name} did not exit after leaving"
                );
            }
            Nodes::InProcess(c) => {
                // The in-process equivalent of SIGTERM: the peer leaves, then its task ends.
                let left = tokio::time::timeout(limit, c.terminate(name)).await;
                assert!(left.is_ok(), "{name} did not exit after leaving");
            }
        }
    }

    /// SIGKILL for a peer process (processes only).
    pub fn kill(&mut self, name: &str) {
        match self {
            Nodes::Processes(c) => c.peer(name).signal("KILL"),
            Nodes::InProcess(_) => panic!("no SIGKILL for in-process peers"),
        }
    }
}
