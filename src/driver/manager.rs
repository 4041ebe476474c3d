//! The manager's shell: a span per client request (kept open until the request's outcome),
//! files loaded off the runtime thread, logs of what the manager did.

use super::{Control, DriveOptions, Shared, Shell, Shutdown, bind_udp, drive, shared};
use crate::config::Config;
use crate::link::Time;
use crate::manager::{Manager, ManagerEvent, ManagerInput};
use crate::measure::KeyCensus;
use crate::record::{Dataset, LoadError, RecordKey};
use crate::telemetry::{TARGET, set_remote_parent};
use crate::wire::{Body, ClientRequest, Envelope};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::mpsc;
use tracing::{Span, field, info, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Reads the CSV a distribute names, handing each chunk of rows to the sink as it is read (the
/// sink returns false to stop).
pub type LoadFn =
    Arc<dyn Fn(&str, &mut dyn FnMut(Dataset) -> bool) -> Result<(), LoadError> + Send + Sync>;

/// Reads only the keys of the CSV a distribute names, in file order, for its census (the sink
/// returns false to stop).
pub type KeyScanFn =
    Arc<dyn Fn(&str, &mut dyn FnMut(RecordKey) -> bool) -> Result<(), LoadError> + Send + Sync>;

/// Rows per chunk read ahead of the manager.
pub const CHUNK_ROWS: usize = 8_192;

/// The loader of a real manager: the file system, streamed on a blocking thread.
pub fn disk_loader() -> LoadFn {
    Arc::new(|path: &str, sink: &mut dyn FnMut(Dataset) -> bool| {
        crate::record::stream_path(std::path::Path::new(path), CHUNK_ROWS, sink)
    })
}

/// The census's reader of a real manager: the keys alone, a third of a full parse's time.
pub fn disk_key_scan() -> KeyScanFn {
    Arc::new(|path: &str, sink: &mut dyn FnMut(RecordKey) -> bool| {
        crate::record::scan_keys_path(std::path::Path::new(path), sink)
    })
}

/// What the reading thread hands the shell.
enum Loaded {
    Census(Box<KeyCensus>),
    Chunk(Dataset),
    Done(Result<(), LoadError>),
}

/// Rows a census reads ahead of the distribute at most. Keys hash independently of their
/// order in the file, so the first million rows are as good a sample as any; and beyond a few
/// thousand rows per peer, row counts are even anyway. (Reading a 508 MB file whole once more
/// took 20 s.)
pub const CENSUS_ROWS: u64 = 1_000_000;

/// Reads the file at `path`: first the keys of its first [`CENSUS_ROWS`] rows, counted, when
/// `census` is asked for (with `scan` when there is one, else with `load`); then chunk by chunk
/// with `load` into `send` (which returns false to stop).
fn read_file(
    load: &LoadFn,
    scan: Option<&KeyScanFn>,
    path: &str,
    census: bool,
    send: &mut dyn FnMut(Loaded) -> bool,
) {
    if census {
        let mut counted = KeyCensus::default();
        let result = match scan {
            Some(scan) => scan(path, &mut |key| {
                counted.add(key);
                counted.total() < CENSUS_ROWS
            })
            // The scan does not track lines; the full reader names the line of the error.
            .or_else(|e| load(path, &mut |_| true).and(Err(e))),
            None => load(path, &mut |chunk| {
                for row in chunk
                    .rows
                    .iter()
                    .take((CENSUS_ROWS - counted.total()) as usize)
                {
                    counted.add(row.key);
                }
                counted.total() < CENSUS_ROWS
            }),
        };
        if let Err(e) = result {
            send(Loaded::Done(Err(e)));
            return;
        }
        if !send(Loaded::Census(Box::new(counted))) {
            return;
        }
    }
    let result = load(path, &mut |chunk| send(Loaded::Chunk(chunk)));
    send(Loaded::Done(result));
}

/// The file a distribute job is reading.
struct Reading {
    job: u64,
    /// Chunks from the reading thread: at most one waits, so the thread reads ahead by one.
    rx: mpsc::Receiver<Loaded>,
    /// The manager asked for the next chunk.
    wanted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SpanKey {
    Query(u64),
    Distribute(u64),
}

pub struct ManagerShell {
    spans: HashMap<SpanKey, Span>,
    load: LoadFn,
    /// The census's key reader; None: the census reads with `load`.
    scan: Option<KeyScanFn>,
    /// Load on a blocking thread (real files) or inline (the simulation's memory files).
    blocking: bool,
    reading: Option<Reading>,
}

impl ManagerShell {
    pub fn new(load: LoadFn, blocking: bool) -> Self {
        ManagerShell {
            spans: HashMap::new(),
            load,
            scan: None,
            blocking,
            reading: None,
        }
    }

    /// Counts a census with `scan` instead of full rows.
    pub fn with_key_scan(mut self, scan: KeyScanFn) -> Self {
        self.scan = Some(scan);
        self
    }

    fn load_file(&mut self, job: u64, path: String, census: bool) {
        info!(%path, census, "reading records");
        let load = self.load.clone();
        let scan = self.scan.clone();
        let rx = if self.blocking {
            // A bounded channel: the thread blocks once a chunk waits, so memory stays bounded.
            // The receiver is gone only when the job or the loop ended.
            let (tx, rx) = mpsc::channel(1);
            tokio::task::spawn_blocking(move || {
                read_file(&load, scan.as_ref(), &path, census, &mut |l| {
                    tx.blocking_send(l).is_ok()
                });
            });
            rx
        } else {
            // The simulation's files are small and in memory: read them at once.
            let mut chunks = Vec::new();
            read_file(&load, scan.as_ref(), &path, census, &mut |l| {
                chunks.push(l);
                true
            });
            let (tx, rx) = mpsc::channel(chunks.len());
            for c in chunks {
                let _ = tx.try_send(c);
            }
            rx
        };
        // A new job replaces an older one's reading (the manager runs one distribute at once).
        self.reading = Some(Reading {
            job,
            rx,
            wanted: true,
        });
    }
}

impl Shell<Manager> for ManagerShell {
    type Exit = ();

    fn open_span(&mut self, _: &Manager, from: SocketAddr, env: &Envelope) -> Option<Span> {
        let Body::Request(req) = &env.body else {
            return None;
        };
        let span = tracing::info_span!(
            target: TARGET,
            "manager",
            otel.name = field::Empty,
            otel.kind = "server",
            command = req.kind(),
            event.id = field::Empty,
            found = field::Empty,
            path = field::Empty,
            entry.peer.id = field::Empty,
            network.transport = "udp",
            network.peer.address = field::Empty,
            network.peer.port = field::Empty,
            client.address = %from.ip(),
        );
        span.record("otel.name", format!("manager {}", req.kind()));
        if let ClientRequest::Query { key, .. } = req {
            span.record("event.id", key.to_string());
        }
        set_remote_parent(&span, env.trace.as_ref());
        Some(span)
    }

    fn close_span(&mut self, span: Span, events: &[ManagerEvent]) {
        // A long-running request's span stays open until the manager reports its end.
        let mut keep = None;
        for ev in events {
            match ev {
                ManagerEvent::QueryDispatched {
                    query,
                    entry,
                    entry_addr,
                    ..
                } => {
                    span.record("entry.peer.id", *entry);
                    span.record("network.peer.address", entry_addr.ip().to_string());
                    span.record("network.peer.port", entry_addr.port());
                    keep = Some(SpanKey::Query(*query));
                }
                ManagerEvent::LoadFile { job, .. } => keep = Some(SpanKey::Distribute(*job)),
                _ => {}
            }
        }
        if let Some(key) = keep {
            self.spans.insert(key, span);
        }
    }

    fn on_event(&mut self, ev: ManagerEvent) -> Control<()> {
        match ev {
            ManagerEvent::LoadFile { job, path, census } => self.load_file(job, path, census),
            ManagerEvent::WantRows { job } => {
                if let Some(r) = self.reading.as_mut().filter(|r| r.job == job) {
                    r.wanted = true;
                }
            }
            ManagerEvent::PeerRegistered { id, name, addr } => {
                info!(id, %name, %addr, "peer registered")
            }
            ManagerEvent::RingChanged {
                epoch,
                settled,
                members,
            } => info!(epoch, settled, members, "ring changed"),
            ManagerEvent::PeerLeft { id, name } => info!(id, %name, "peer left"),
            ManagerEvent::PeerSuspected { id } => warn!(
                id,
                "peer suspected: silent; probing it directly and through its neighbours"
            ),
            ManagerEvent::PeerAlive { id } => info!(id, "suspected peer heard from again"),
            ManagerEvent::PeerDead { id, name } => {
                warn!(id, %name, "peer declared dead; rebuilding the ring without it")
            }
            ManagerEvent::Recovered {
                epoch,
                members,
                missing,
            } => info!(
                epoch,
                members, missing, "rebuilt the ring from the peers that registered again"
            ),
            ManagerEvent::QueryDispatched { .. } => {}
            ManagerEvent::QueryDone { query, found, path } => {
                if let Some(span) = self.spans.remove(&SpanKey::Query(query)) {
                    span.record("found", found);
                    span.record("path", format!("{path:?}"));
                }
            }
            ManagerEvent::QueryFailed { query, reason } => {
                if let Some(span) = self.spans.remove(&SpanKey::Query(query)) {
                    span.set_status(opentelemetry::trace::Status::error(reason));
                }
            }
            ManagerEvent::DistributeDone {
                job,
                stored,
                elapsed,
            } => {
                info!(
                    stored,
                    elapsed_ms = elapsed.as_secs_f64() * 1e3,
                    "distribute done"
                );
                self.spans.remove(&SpanKey::Distribute(job));
            }
            ManagerEvent::DistributeFailed { job, reason } => {
                warn!("distribute failed: {reason}");
                if let Some(span) = self.spans.remove(&SpanKey::Distribute(job)) {
                    span.set_status(opentelemetry::trace::Status::error(reason));
                }
            }
            ManagerEvent::Warning(w) => warn!("{w}"),
        }
        Control::Continue
    }

    async fn next_local(&mut self) -> ManagerInput {
        let Some(reading) = self.reading.as_mut().filter(|r| r.wanted) else {
            return std::future::pending().await;
        };
        let job = reading.job;
        match reading.rx.recv().await {
            // The rows follow at once: the manager still wants them.
            Some(Loaded::Census(census)) => ManagerInput::Census { job, census },
            Some(Loaded::Chunk(chunk)) => {
                reading.wanted = false;
                ManagerInput::Rows { job, chunk }
            }
            Some(Loaded::Done(result)) => {
                self.reading = None;
                ManagerInput::LoadDone { job, result }
            }
            // The reading thread ended without a word (it panicked): say so.
            None => {
                self.reading = None;
                let source = std::io::Error::other("the reading thread stopped");
                ManagerInput::LoadDone {
                    job,
                    result: Err(LoadError::Io {
                        path: None,
                        line: None,
                        source,
                    }),
                }
            }
        }
    }

    fn on_shutdown(&mut self, _: &mut Manager, _: Time) -> Result<Vec<ManagerEvent>, ()> {
        info!("manager shutting down");
        Err(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Socket(#[from] super::SocketError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("could not read the bound address of {addr}: {source}")]
    LocalAddr {
        addr: String,
        source: std::io::Error,
    },
    #[error("could not make the socket bound to {addr} blocking: {source}")]
    Blocking {
        addr: String,
        source: std::io::Error,
    },
}

/// What every node starts with: its driver options (the keyring read), its socket bound to
/// `listen`, and the address it got.
pub(super) async fn open_node(
    cfg: &Config,
) -> Result<(DriveOptions, tokio::net::UdpSocket, SocketAddr), NodeError> {
    let options = cfg.drive_options()?;
    let socket = bind_udp(&cfg.listen, cfg.socket_buffer).await?;
    let local = socket.local_addr().map_err(|source| NodeError::LocalAddr {
        addr: cfg.listen.clone(),
        source,
    })?;
    Ok((options, socket, local))
}

/// Runs a manager on real UDP until `shutdown` fires. `ready` receives the bound address.
pub async fn run_manager(
    cfg: &Config,
    shutdown: Shutdown,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), NodeError> {
    let (options, socket, local) = open_node(cfg).await?;
    let manager = shared(Manager::new(cfg.manager_config(), rand::random()));
    info!(%local, placement = ?cfg.placement, "manager listening");
    if let Some(tx) = ready {
        let _ = tx.send(local);
    }
    let mut shell = ManagerShell::new(disk_loader(), true).with_key_scan(disk_key_scan());
    drive(&socket, &manager, &mut shell, shutdown, &options).await;
    Ok(())
}

/// A manager machine ready to be driven, for callers that bring their own socket.
pub fn manager_machine(cfg: &Config, incarnation: u64) -> Shared<Manager> {
    shared(Manager::new(cfg.manager_config(), incarnation))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `read_file` hands on: the census, the rows, and how it ended.
    fn read(path: &str, scan: Option<&KeyScanFn>) -> (Option<KeyCensus>, usize, Option<String>) {
        let (mut census, mut rows, mut error) = (None, 0, None);
        read_file(&disk_loader(), scan, path, true, &mut |l| {
            match l {
                Loaded::Census(c) => census = Some(*c),
                Loaded::Chunk(d) => rows += d.rows.len(),
                Loaded::Done(r) => error = r.err().map(|e| e.to_string()),
            }
            true
        });
        (census, rows, error)
    }

    #[test]
    fn the_key_scan_counts_the_census_the_rows_would() {
        let dir = std::env::temp_dir().join(format!("stormdht-census-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Some ids, a row without one (a fallback key), a short row (rejected).
        let mut text = String::from("event_id,state,year\n");
        for i in 0..5_000 {
            text.push_str(&format!("{},KANSAS,{}\n", 10_000 + i * 7, 1990 + i % 30));
        }
        text.push_str(",TEXAS,1996\nshort\n");
        let path = dir.join("course.csv");
        std::fs::write(&path, &text).unwrap();
        let path = path.to_str().unwrap();
        let by_rows = read(path, None);
        let by_keys = read(path, Some(&disk_key_scan()));
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(by_rows.0.as_ref().map(KeyCensus::total), Some(5_001));
        assert_eq!(by_keys, by_rows);
    }

    #[test]
    fn a_census_that_fails_names_the_line_as_the_rows_would() {
        let dir = std::env::temp_dir().join(format!("stormdht-census-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Truncated gzip: an I/O error part way, which the full reader places by line.
        let mut text = String::from("event_id,state,year\n");
        for i in 0..20_000 {
            text.push_str(&format!("{},KANSAS,1996\n", 10_000 + i));
        }
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, text.as_bytes()).unwrap();
        let gz = enc.finish().unwrap();
        let path = dir.join("cut.csv.gz");
        std::fs::write(&path, &gz[..gz.len() / 2]).unwrap();
        let path = path.to_str().unwrap();
        let (census, rows, error) = read(path, Some(&disk_key_scan()));
        let (_, _, by_rows) = read(path, None);
        std::fs::remove_dir_all(&dir).ok();
        assert_eq!(
            (census, rows),
            (None, 0),
            "nothing is handed on after a failed census"
        );
        let error = error.expect("the census fails");
        assert!(error.contains("near line"), "{error}");
        assert_eq!(Some(error), by_rows);
    }
}
