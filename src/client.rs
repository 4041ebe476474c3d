//! The client side of `stormctl`: reliable requests to the manager over UDP, many at a time,
//! and `verify`, which checks a CSV file against what the ring answers.

use crate::auth::{Keyring, open_if_keyed, seal_if_keyed};
use crate::driver::socket::DatagramSocket;
use crate::driver::{bind_udp, lookup};
use crate::link::{Accepted, Link, Outcome, RetryPolicy, Time, Transmit};
use crate::record::{Dataset, RecordKey};
use crate::wire::{
    Body, ClientRequest, Envelope, RejectReason, ReplyBody, RequestError, TraceContext,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ClientError {
    #[error(
        "cannot resolve the manager address '{addr}': {reason} (check --manager or STORMCTL_MANAGER: HOST:PORT)"
    )]
    Resolve { addr: String, reason: String },
    #[error("UDP socket error: {0}")]
    Io(String),
    #[error(
        "the manager at {manager} did not answer ({attempts} attempts over {secs:.1} s); is it running at that address, and if the cluster has a key, does stormctl have it (--key-file or STORMCTL_KEY)?"
    )]
    NoAnswer {
        manager: SocketAddr,
        attempts: u32,
        secs: f64,
    },
    #[error(
        "the manager at {manager} acknowledged the request but sent no reply within {secs:.1} s: it may still be working (a large distribute): raise --timeout, and see stormctl status"
    )]
    NoReply { manager: SocketAddr, secs: f64 },
    #[error("the manager rejected the request: {0}")]
    Rejected(RejectReason),
    /// The manager handled the request and reports an error.
    #[error("{0}")]
    Failed(RequestError),
    #[error("the request could not be encoded: {0}")]
    Encode(String),
    /// A result was asked of a request that was never sent (a bug, reported rather than a panic).
    #[error("the request produced no result")]
    NoResult,
}

/// The client's protocol, sans-IO: requests queued, at most `window` outstanding, each
/// retransmitted until the manager acknowledges it, then awaited until its reply or a timeout.
/// Time comes in as an argument; datagrams and results are pulled.
pub struct ClientCore {
    manager: SocketAddr,
    link: Link<usize>,
    /// How long to wait for a reply once the manager has acknowledged a request.
    reply_timeout: Duration,
    window: usize,
    queue: VecDeque<(usize, ClientRequest, Option<TraceContext>)>,
    in_flight: HashMap<u64, InFlight>,
    results: VecDeque<(usize, Result<ReplyBody, ClientError>)>,
    /// What the manager said of requests under way: (index, done, total).
    progress: VecDeque<(usize, u64, u64)>,
}

struct InFlight {
    index: usize,
    sent_at: Time,
    acked_at: Option<Time>,
}

/// How the client retransmits a request the manager has not acknowledged: about 4 s in all.
pub fn client_retry() -> RetryPolicy {
    RetryPolicy {
        initial: Duration::from_millis(250),
        max: Duration::from_secs(1),
        attempts: Some(6),
    }
}

impl ClientCore {
    pub fn new(
        manager: SocketAddr,
        incarnation: u64,
        policy: RetryPolicy,
        reply_timeout: Duration,
    ) -> Self {
        ClientCore {
            manager,
            link: Link::new(incarnation, policy),
            reply_timeout,
            window: 1,
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            results: VecDeque::new(),
            progress: VecDeque::new(),
        }
    }

    pub fn manager(&self) -> SocketAddr {
        self.manager
    }

    /// Requests outstanding at once.
    pub fn set_window(&mut self, window: usize) {
        self.window = window.max(1);
    }

    /// Queues request number `index`; its result comes back under the same number.
    pub fn submit(&mut self, index: usize, req: ClientRequest, trace: Option<TraceContext>) {
        self.queue.push_back((index, req, trace));
    }

    /// Nothing queued, nothing outstanding.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.in_flight.is_empty()
    }

    /// Sends queued requests while the window allows.
    pub fn pump(&mut self, now: Time) {
        while self.in_flight.len() < self.window {
            let Some((index, req, trace)) = self.queue.pop_front() else {
                return;
            };
            match self
                .link
                .send(now, self.manager, Body::Request(req), trace, index)
            {
                Ok(seq) => {
                    let f = InFlight {
                        index,
                        sent_at: now,
                        acked_at: None,
                    };
                    self.in_flight.insert(seq, f);
                }
                Err(e) => self
                    .results
                    .push_back((index, Err(ClientError::Encode(e.to_string())))),
            }
        }
    }

    pub fn handle(&mut self, now: Time, from: SocketAddr, env: Envelope) {
        if self.link.accept(now, from, &env) == Accepted::New {
            match env.body {
                Body::Reply(reply) => {
                    if let Some(f) = self.in_flight.remove(&reply.to) {
                        self.link.cancel(reply.to);
                        let result = reply.result.map_err(ClientError::Failed);
                        self.results.push_back((f.index, result));
                    }
                }
                // Only from the manager, about a request it acknowledged: the request is
                // alive, so its reply deadline starts again.
                Body::Progress { to, done, total } if from == self.manager => {
                    if let Some(f) = self.in_flight.get_mut(&to)
                        && f.acked_at.is_some()
                    {
                        f.acked_at = Some(now);
                        self.progress.push_back((f.index, done, total));
                    }
                }
                _ => {}
            }
        }
        self.drain_outcomes(now);
    }

    /// The next word from the manager on a request under way: (index, done, total).
    pub fn poll_progress(&mut self) -> Option<(usize, u64, u64)> {
        self.progress.pop_front()
    }

    pub fn handle_timeout(&mut self, now: Time) {
        self.link.handle_timeout(now);
        self.drain_outcomes(now);
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.acked_at.is_some_and(|a| now >= a + self.reply_timeout))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            if let Some(f) = self.in_flight.remove(&seq) {
                let err = ClientError::NoReply {
                    manager: self.manager,
                    secs: self.reply_timeout.as_secs_f64(),
                };
                self.results.push_back((f.index, Err(err)));
            }
        }
    }

    /// The next retransmission or reply deadline.
    pub fn poll_timeout(&self) -> Option<Time> {
        let replies = self
            .in_flight
            .values()
            .filter_map(|f| f.acked_at)
            .min()
            .map(|a| a + self.reply_timeout);
        [self.link.poll_timeout(), replies]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.link.poll_transmit()
    }

    pub fn poll_result(&mut self) -> Option<(usize, Result<ReplyBody, ClientError>)> {
        self.results.pop_front()
    }

    fn seq_of(&self, index: usize) -> Option<u64> {
        self.in_flight
            .iter()
            .find(|(_, f)| f.index == index)
            .map(|(seq, _)| *seq)
    }

    fn drain_outcomes(&mut self, now: Time) {
        while let Some(outcome) = self.link.poll_outcome() {
            match outcome {
                Outcome::Acked { tag, .. } => {
                    if let Some(seq) = self.seq_of(tag)
                        && let Some(f) = self.in_flight.get_mut(&seq)
                    {
                        f.acked_at.get_or_insert(now);
                    }
                }
                Outcome::Rejected { tag, reason } => {
                    if let Some(seq) = self.seq_of(tag)
                        && let Some(f) = self.in_flight.remove(&seq)
                    {
                        let err = ClientError::Rejected(reason);
                        self.results.push_back((f.index, Err(err)));
                    }
                }
                Outcome::GaveUp { tag, attempts, .. } => {
                    if let Some(seq) = self.seq_of(tag)
                        && let Some(f) = self.in_flight.remove(&seq)
                    {
                        let err = ClientError::NoAnswer {
                            manager: self.manager,
                            attempts,
                            secs: now.saturating_sub(f.sent_at).as_secs_f64(),
                        };
                        self.results.push_back((f.index, Err(err)));
                    }
                }
            }
        }
    }
}

/// [`ClientCore`] over a datagram socket: real UDP for `stormctl`, the in-memory network in
/// the simulations.
pub struct Client<S = UdpSocket> {
    socket: S,
    core: ClientCore,
    start: Instant,
    buf: Vec<u8>,
    /// The cluster's keyring, when it has one: requests are sealed, replies must be.
    keyring: Option<Keyring>,
}

impl Client<UdpSocket> {
    pub async fn connect(manager: &str, reply_timeout: Duration) -> Result<Client, ClientError> {
        let addr = lookup(manager).await.map_err(|e| ClientError::Resolve {
            addr: manager.to_string(),
            reason: e.to_string(),
        })?;
        let bind: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = bind_udp(&bind.to_string(), 4 << 20)
            .await
            .map_err(|e| ClientError::Io(e.to_string()))?;
        let core = ClientCore::new(addr, rand::random(), client_retry(), reply_timeout);
        Ok(Client::over(socket, core))
    }
}

impl<S: DatagramSocket> Client<S> {
    pub fn over(socket: S, core: ClientCore) -> Self {
        Client {
            socket,
            core,
            start: Instant::now(),
            buf: vec![0; 65_536],
            keyring: None,
        }
    }

    /// Seals requests with `keyring`'s first key and hears only replies sealed by one of its.
    pub fn with_keyring(mut self, keyring: Option<Keyring>) -> Self {
        self.keyring = keyring;
        self
    }

    async fn send(&self, t: &Transmit) {
        let bytes = seal_if_keyed(self.keyring.as_ref(), &t.bytes);
        if let Err(e) = self.socket.send_to(&bytes, t.dest).await {
            tracing::debug!("send to {} failed: {e}", t.dest);
        }
    }

    pub fn manager(&self) -> SocketAddr {
        self.core.manager()
    }

    /// One request, one reply.
    pub async fn call(
        &mut self,
        req: ClientRequest,
        trace: Option<TraceContext>,
    ) -> Result<ReplyBody, ClientError> {
        let mut out = self.call_many(vec![(req, trace)], 1).await;
        out.pop().unwrap_or(Err(ClientError::NoResult))
    }

    /// Many requests with at most `window` outstanding; results in request order.
    pub async fn call_many(
        &mut self,
        requests: Vec<(ClientRequest, Option<TraceContext>)>,
        window: usize,
    ) -> Vec<Result<ReplyBody, ClientError>> {
        self.call_many_with(requests, window, |_, _| {}).await
    }

    /// One request, telling `progress` (done, total) whenever the manager reports how far it
    /// is (a distribute does, every 100 ms).
    pub async fn call_with_progress(
        &mut self,
        req: ClientRequest,
        trace: Option<TraceContext>,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<ReplyBody, ClientError> {
        let mut out = self
            .drive(
                vec![(req, trace)],
                1,
                |_, _| {},
                |_, done, total| progress(done, total),
            )
            .await;
        out.pop().unwrap_or(Err(ClientError::NoResult))
    }

    /// As [`Client::call_many`], telling `progress` (done, total) as results come in.
    pub async fn call_many_with(
        &mut self,
        requests: Vec<(ClientRequest, Option<TraceContext>)>,
        window: usize,
        progress: impl FnMut(usize, usize),
    ) -> Vec<Result<ReplyBody, ClientError>> {
        self.drive(requests, window, progress, |_, _, _| {}).await
    }

    /// Sends `requests` with at most `window` outstanding until each has a result; `results_in`
    /// hears (results so far, total), `server_progress` what the manager says of a request.
    async fn drive(
        &mut self,
        requests: Vec<(ClientRequest, Option<TraceContext>)>,
        window: usize,
        mut results_in: impl FnMut(usize, usize),
        mut server_progress: impl FnMut(usize, u64, u64),
    ) -> Vec<Result<ReplyBody, ClientError>> {
        let total = requests.len();
        let mut results: Vec<Option<Result<ReplyBody, ClientError>>> = vec![None; total];
        self.core.set_window(window);
        for (index, (req, trace)) in requests.into_iter().enumerate() {
            self.core.submit(index, req, trace);
        }
        let mut done = 0;
        while !self.core.is_idle() {
            self.core.pump(self.start.elapsed());
            while let Some(t) = self.core.poll_transmit() {
                self.send(&t).await;
            }
            let wake = self.core.poll_timeout().map(|t| self.start + t);
            let received = tokio::select! {
                r = self.socket.recv_from(&mut self.buf) => Some(r),
                _ = sleep_until(wake) => None,
            };
            let now = self.start.elapsed();
            match received {
                Some(Ok((len, from))) => {
                    let payload = open_if_keyed(self.keyring.as_ref(), &self.buf[..len]).ok();
                    if let Some(env) = payload.and_then(|p| Envelope::decode(p).ok()) {
                        self.core.handle(now, from, env);
                    }
                }
                Some(Err(e)) => tracing::debug!("receive failed: {e}"),
                None => {}
            }
            self.core.handle_timeout(self.start.elapsed());
            while let Some((index, result)) = self.core.poll_result() {
                if let Some(slot) = results.get_mut(index) {
                    *slot = Some(result);
                    done += 1;
                    results_in(done, total);
                }
            }
            while let Some((index, so_far, of)) = self.core.poll_progress() {
                server_progress(index, so_far, of);
            }
            // Acks of replies go out before the next wait.
            while let Some(t) = self.core.poll_transmit() {
                self.send(&t).await;
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or(Err(ClientError::NoResult)))
            .collect()
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
pub async fn verify<S: DatagramSocket>(
    client: &mut Client<S>,
    file: &str,
    dataset: &Dataset,
    window: usize,
) -> VerifyReport {
    verify_with(client, file, dataset, window, |_, _| {}).await
}

/// As [`verify`], telling `progress` (keys checked, keys in all) as answers come in.
pub async fn verify_with<S: DatagramSocket>(
    client: &mut Client<S>,
    file: &str,
    dataset: &Dataset,
    window: usize,
    progress: impl FnMut(usize, usize),
) -> VerifyReport {
    let started = std::time::Instant::now();
    let mut expected: BTreeMap<RecordKey, Vec<&Vec<String>>> = BTreeMap::new();
    for row in &dataset.rows {
        expected.entry(row.key).or_default().push(&row.values);
    }
    let keys: Vec<RecordKey> = expected.keys().copied().collect();
    let requests = keys
        .iter()
        .map(|k| {
            (
                ClientRequest::Query {
                    key: *k,
                    via: None,
                    routing: None,
                },
                None,
            )
        })
        .collect();
    let results = client.call_many_with(requests, window, progress).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::UNSEQUENCED;

    fn manager() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5000))
    }

    /// A core with one distribute sent and acknowledged at t=0; its reply deadline is 1 s.
    fn acknowledged() -> (ClientCore, u64) {
        let mut core = ClientCore::new(manager(), 1, client_retry(), Duration::from_secs(1));
        core.submit(0, ClientRequest::Distribute { path: None }, None);
        core.pump(Duration::ZERO);
        let sent = core.poll_transmit().expect("the request");
        let seq = Envelope::decode(&sent.bytes).expect("decodes").seq;
        let ack = Body::Ack {
            seq,
            new_rows: None,
        };
        core.handle(
            Duration::ZERO,
            manager(),
            Envelope::new(9, UNSEQUENCED, None, ack),
        );
        (core, seq)
    }

    fn progress(to: u64, done: u64) -> Envelope {
        Envelope::new(
            9,
            UNSEQUENCED,
            None,
            Body::Progress {
                to,
                done,
                total: 100,
            },
        )
    }

    #[test]
    fn progress_from_the_manager_is_reported_and_keeps_the_request_alive() {
        let (mut core, seq) = acknowledged();
        let at = Duration::from_millis(900);
        core.handle(at, manager(), progress(seq, 40));
        assert_eq!(core.poll_progress(), Some((0, 40, 100)));
        // Without the progress the reply deadline would have passed at 1 s.
        core.handle_timeout(Duration::from_millis(1_500));
        assert!(core.poll_result().is_none());
        core.handle_timeout(Duration::from_millis(1_950));
        assert!(matches!(
            core.poll_result(),
            Some((0, Err(ClientError::NoReply { .. })))
        ));
    }

    #[test]
    fn progress_from_a_stranger_or_for_another_request_is_ignored() {
        let (mut core, seq) = acknowledged();
        let stranger = SocketAddr::from(([127, 0, 0, 1], 6666));
        core.handle(Duration::from_millis(500), stranger, progress(seq, 40));
        core.handle(Duration::from_millis(500), manager(), progress(seq + 1, 40));
        assert_eq!(core.poll_progress(), None);
        core.handle_timeout(Duration::from_millis(1_100));
        assert!(matches!(
            core.poll_result(),
            Some((0, Err(ClientError::NoReply { .. })))
        ));
    }
}
