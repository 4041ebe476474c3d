//! A whole cluster in one process on loopback: the manager and its peers as tokio tasks over
//! real UDP sockets. The demo and the benchmarks run on it.

use crate::client::Client;
use crate::config::{Config, Role};
use crate::driver::manager::NodeError;
use crate::driver::{PeerExit, run_manager, run_peer};
use crate::wire::{ClientRequest, ReplyBody};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

pub struct LocalPeer {
    pub name: String,
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<PeerExit, NodeError>>,
}

pub struct LocalCluster {
    pub manager: SocketAddr,
    base: Config,
    manager_stop: watch::Sender<bool>,
    manager_task: JoinHandle<Result<(), NodeError>>,
    pub peers: Vec<LocalPeer>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("{0}")]
    Start(String),
}

impl LocalCluster {
    /// Starts a manager on a free loopback port and `peers` peers named `{prefix}-{i}`.
    pub async fn start(
        base: &Config,
        peers: usize,
        prefix: &str,
    ) -> Result<LocalCluster, ClusterError> {
        let mut cfg = base.clone();
        cfg.role = Role::Manager;
        cfg.listen = "127.0.0.1:0".into();
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = oneshot::channel();
        let manager_task =
            tokio::spawn(async move { run_manager(&cfg, stop_rx, Some(ready_tx)).await });
        let manager = ready_rx
            .await
            .map_err(|_| ClusterError::Start("the manager did not start".into()))?;
        let mut cluster = LocalCluster {
            manager,
            base: base.clone(),
            manager_stop: stop,
            manager_task,
            peers: Vec::new(),
        };
        for i in 0..peers {
            cluster.add_peer(&format!("{prefix}-{i}")).await?;
        }
        Ok(cluster)
    }

    pub async fn add_peer(&mut self, name: &str) -> Result<(), ClusterError> {
        let mut cfg = self.base.clone();
        cfg.role = Role::Peer;
        cfg.name = name.to_string();
        cfg.listen = "127.0.0.1:0".into();
        cfg.manager = self.manager.to_string();
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(async move { run_peer(&cfg, stop_rx, Some(ready_tx)).await });
        let addr = ready_rx
            .await
            .map_err(|_| ClusterError::Start(format!("peer {name} did not start")))?;
        self.peers.push(LocalPeer {
            name: name.to_string(),
            addr,
            stop,
            task,
        });
        Ok(())
    }

    /// Waits until the manager knows `n` peers.
    pub async fn wait_registered(
        &self,
        client: &mut Client,
        n: usize,
        limit: Duration,
    ) -> Result<(), ClusterError> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(ReplyBody::Status(s)) = client.call(ClientRequest::Status, None).await
                && s.peers.len() >= n
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Start(format!(
                    "fewer than {n} peers registered within {limit:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM for one peer: it leaves gracefully. Returns how it exited.
    pub async fn terminate(&mut self, name: &str) -> Option<PeerExit> {
        let i = self.peers.iter().position(|p| p.name == name)?;
        let peer = self.peers.remove(i);
        let _ = peer.stop.send(true);
        peer.task.await.ok()?.ok()
    }

    /// Waits for every peer task to end (after a teardown) and stops the manager.
    pub async fn finish(self) -> Vec<(String, Option<PeerExit>)> {
        let mut exits = Vec::new();
        for p in self.peers {
            let exit = tokio::time::timeout(Duration::from_secs(10), p.task).await;
            exits.push((p.name, exit.ok().and_then(|r| r.ok()).and_then(|r| r.ok())));
        }
        let _ = self.manager_stop.send(true);
        let _ = self.manager_task.await;
        exits
    }
}
