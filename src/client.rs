//! The client side of `stormctl`: reliable requests to the manager over UDP, many at a time,
//! and `verify`, which checks a CSV file against what the ring answers.

use crate::link::{Accepted, Link, Outcome, RetryPolicy};
use crate::record::{Dataset, RecordKey};
use crate::wire::{Body, ClientRequest, Envelope, ReplyBody, TraceContext};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ClientError {
    #[error("cannot resolve the manager address '{addr}': {reason}")]
    Resolve { addr: String, reason: String },
    #[error("UDP socket error: {0}")]
    Io(String),
    #[error(
        "the manager at {manager} did not answer ({attempts} attempts over {secs:.1} s); is it running?"
    )]
    NoAnswer {
        manager: SocketAddr,
        attempts: u32,
        secs: f64,
    },
    #[error(
        "the manager at {manager} acknowledged the request but sent no reply within {secs:.1} s"
    )]
    NoReply { manager: SocketAddr, secs: f64 },
    #[error("the manager rejected the request: {0}")]
    Rejected(String),
    /// The manager handled the request and reports an error.
    #[error("{0}")]
    Failed(String),
}

pub struct Client {
    socket: UdpSocket,
    manager: SocketAddr,
    link: Link<u64>,
    start: Instant,
    /// How long to wait for a reply once the manager has acknowledged a request.
    pub reply_timeout: Duration,
    buf: Vec<u8>,
}

struct InFlight {
    index: usize,
    acked_at: Option<Instant>,
    sent_at: Instant,
}

impl Client {
    pub async fn connect(manager: &str, reply_timeout: Duration) -> Result<Client, ClientError> {
        let addr = crate::config::resolve(manager).map_err(|e| ClientError::Resolve {
            addr: manager.to_string(),
            reason: e.to_string(),
        })?;
        let bind: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = crate::node::bind_udp(&bind.to_string(), 4 << 20)
            .map_err(|e| ClientError::Io(e.to_string()))?;
        let policy = RetryPolicy {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(1),
            attempts: Some(6),
        };
        Ok(Client {
            socket,
            manager: addr,
            link: Link::new(rand::random(), policy),
            start: Instant::now(),
            reply_timeout,
            buf: vec![0; 65_536],
        })
    }

    pub fn manager(&self) -> SocketAddr {
        self.manager
    }

    /// One request, one reply.
    pub async fn call(
        &mut self,
        req: ClientRequest,
        trace: Option<TraceContext>,
    ) -> Result<ReplyBody, ClientError> {
        let mut out = self.call_many(vec![(req, trace)], 1).await;
        out.pop()
            .unwrap_or_else(|| Err(ClientError::Failed("no reply".into())))
    }

    /// Many requests with at most `window` outstanding; results in request order.
    pub async fn call_many(
        &mut self,
        requests: Vec<(ClientRequest, Option<TraceContext>)>,
        window: usize,
    ) -> Vec<Result<ReplyBody, ClientError>> {
        let total = requests.len();
        let mut results: Vec<Option<Result<ReplyBody, ClientError>>> = vec![None; total];
        let mut queue: VecDeque<(usize, ClientRequest, Option<TraceContext>)> = requests
            .into_iter()
            .enumerate()
            .map(|(i, (r, t))| (i, r, t))
            .collect();
        let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
        let mut done = 0;
        while done < total {
            while in_flight.len() < window.max(1) {
                let Some((index, req, trace)) = queue.pop_front() else {
                    break;
                };
                let now = self.start.elapsed();
                match self
                    .link
                    .send(now, self.manager, Body::Request(req), trace, index as u64)
                {
                    Ok(seq) => {
                        in_flight.insert(
                            seq,
                            InFlight {
                                index,
                                acked_at: None,
                                sent_at: Instant::now(),
                            },
                        );
                    }
                    Err(e) => {
                        results[index] = Some(Err(ClientError::Failed(e.to_string())));
                        done += 1;
                    }
                }
            }
            while let Some(t) = self.link.poll_transmit() {
                if let Err(e) = self.socket.send_to(&t.bytes, t.dest).await {
                    tracing::debug!("send to {} failed: {e}", t.dest);
                }
            }
            // Wake for the next retransmission or the earliest reply deadline.
            let retransmit = self.link.poll_timeout().map(|t| self.start + t);
            let reply_deadline = in_flight
                .values()
                .filter_map(|f| f.acked_at)
                .min()
                .map(|a| a + self.reply_timeout);
            let wake = [retransmit, reply_deadline].into_iter().flatten().min();
            let received = match wake {
                Some(at) => {
                    tokio::time::timeout_at(at.into(), self.socket.recv_from(&mut self.buf))
                        .await
                        .ok()
                }
                None => Some(self.socket.recv_from(&mut self.buf).await),
            };
            let now = self.start.elapsed();
            match received {
                Some(Ok((len, from))) => {
                    if let Ok(env) = Envelope::decode(&self.buf[..len])
                        && self.link.accept(now, from, &env) == Accepted::New
                        && let Body::Reply(reply) = env.body
                        && let Some(f) = in_flight.remove(&reply.to)
                    {
                        self.link.cancel(reply.to);
                        results[f.index] = Some(reply.result.map_err(ClientError::Failed));
                        done += 1;
                    }
                }
                Some(Err(e)) => tracing::debug!("receive failed: {e}"),
                None => {}
            }
            self.link.handle_timeout(self.start.elapsed());
            while let Some(outcome) = self.link.poll_outcome() {
                match outcome {
                    Outcome::Acked { tag, .. } => {
                        if let Some(f) = in_flight.values_mut().find(|f| f.index as u64 == tag) {
                            f.acked_at = Some(Instant::now());
                        }
                    }
                    Outcome::Rejected { tag, reason } => {
                        if let Some(seq) = in_flight
                            .iter()
                            .find(|(_, f)| f.index as u64 == tag)
                            .map(|(s, _)| *s)
                            && let Some(f) = in_flight.remove(&seq)
                        {
                            results[f.index] = Some(Err(ClientError::Rejected(reason)));
                            done += 1;
                        }
                    }
                    Outcome::GaveUp { tag, attempts, .. } => {
                        if let Some(seq) = in_flight
                            .iter()
                            .find(|(_, f)| f.index as u64 == tag)
                            .map(|(s, _)| *s)
                            && let Some(f) = in_flight.remove(&seq)
                        {
                            let secs = f.sent_at.elapsed().as_secs_f64();
                            results[f.index] = Some(Err(ClientError::NoAnswer {
                                manager: self.manager,
                                attempts,
                                secs,
                            }));
                            done += 1;
                        }
                    }
                }
            }
            let expired: Vec<u64> = in_flight
                .iter()
                .filter(|(_, f)| {
                    f.acked_at
                        .is_some_and(|a| a.elapsed() >= self.reply_timeout)
                })
                .map(|(s, _)| *s)
                .collect();
            for seq in expired {
                if let Some(f) = in_flight.remove(&seq) {
                    results[f.index] = Some(Err(ClientError::NoReply {
                        manager: self.manager,
                        secs: self.reply_timeout.as_secs_f64(),
                    }));
                    done += 1;
                }
            }
            // Acks for replies still in the link's outbox go out before the next wait.
            while let Some(t) = self.link.poll_transmit() {
                let _ = self.socket.send_to(&t.bytes, t.dest).await;
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ClientError::Failed("no result".into()))))
            .collect()
    }
}

/// What `stormctl verify` found.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyReport {
    pub file: String,
    pub keys: u64,
    pub rows: u64,
    pub found: u64,
    pub missing: u64,
    pub mismatched: u64,
    pub errors: u64,
    pub first_missing: Vec<String>,
    pub first_mismatched: Vec<String>,
    pub first_errors: Vec<String>,
    pub elapsed_ms: f64,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.mismatched == 0 && self.errors == 0 && self.found == self.keys
    }
}

const SAMPLES: usize = 5;

/// Queries every key of `dataset` and compares the rows returned with the file's: a key is
/// found when every row of the file for it comes back (with the same column names and values).
pub async fn verify(
    client: &mut Client,
    file: &str,
    dataset: &Dataset,
    window: usize,
) -> VerifyReport {
    let started = Instant::now();
    let mut expected: BTreeMap<RecordKey, Vec<&Vec<String>>> = BTreeMap::new();
    for row in &dataset.rows {
        expected.entry(row.key).or_default().push(&row.values);
    }
    let keys: Vec<RecordKey> = expected.keys().copied().collect();
    let requests = keys
        .iter()
        .map(|k| (ClientRequest::Query { key: *k, via: None }, None))
        .collect();
    let results = client.call_many(requests, window).await;
    let mut report = VerifyReport {
        file: file.to_string(),
        keys: keys.len() as u64,
        rows: dataset.rows.len() as u64,
        found: 0,
        missing: 0,
        mismatched: 0,
        errors: 0,
        first_missing: Vec::new(),
        first_mismatched: Vec::new(),
        first_errors: Vec::new(),
        elapsed_ms: 0.0,
    };
    for (key, result) in keys.iter().zip(results) {
        match result {
            Ok(ReplyBody::Query(q)) if q.found => {
                let want = &expected[key];
                let all_there = want.iter().all(|values| {
                    q.records
                        .iter()
                        .any(|r| r.columns == dataset.columns && &&r.values == values)
                });
                if all_there {
                    report.found += 1;
                } else {
                    report.mismatched += 1;
                    if report.first_mismatched.len() < SAMPLES {
                        report.first_mismatched.push(key.to_string());
                    }
                }
            }
            Ok(ReplyBody::Query(_)) => {
                report.missing += 1;
                if report.first_missing.len() < SAMPLES {
                    report.first_missing.push(key.to_string());
                }
            }
            Ok(other) => {
                report.errors += 1;
                if report.first_errors.len() < SAMPLES {
                    report
                        .first_errors
                        .push(format!("{key}: unexpected reply {other:?}"));
                }
            }
            Err(e) => {
                report.errors += 1;
                if report.first_errors.len() < SAMPLES {
                    report.first_errors.push(format!("{key}: {e}"));
                }
            }
        }
    }
    report.elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    report
}
