//! The wire format: every datagram is one CBOR-encoded, versioned [`Envelope`].
//!
//! An envelope carries the sender's incarnation (a random number drawn at process start, so a
//! restarted process is never mistaken for its earlier self), a sequence number for
//! acknowledgement and duplicate suppression, an optional W3C trace context, and one [`Body`].
//! Decoding is pure and total: any byte string yields either an envelope or a [`WireError`],
//! never a panic, and allocation is bounded by the datagram's own size.

use crate::record::RecordKey;
pub use crate::ring_delta::RingDelta;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Bumped whenever a change to [`Envelope`] or [`Body`] is not backwards compatible. 3: ring
/// views as deltas, rejoins that name their view (an older peer could not apply the one nor
/// answer for the other; a node of another version is refused with its version named). 4:
/// query hops acknowledged together ([`Body::Acks`]): an older peer could not read them and
/// would route around every neighbour.
pub const PROTOCOL_VERSION: u16 = 4;

/// The largest UDP payload over IPv4.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

/// The largest message the link sends in fragments (a ring view or a status report of
/// thousands of peers); any one datagram still stays within `max_datagram`.
pub const MAX_MESSAGE: usize = 4 << 20;

/// A peer's id, unique for the manager's lifetime. The manager itself is not a peer.
pub type PeerId = u32;

/// Sequence number 0 marks a datagram that is not acknowledged (acks and rejections).
pub const UNSEQUENCED: u64 = 0;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u16,
    /// The sender's incarnation.
    pub from: u64,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceContext>,
    pub body: Body,
}

/// W3C trace context, carried opaquely by the protocol core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub traceparent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// The 32-hex-digit trace id of a well-formed `traceparent`.
    pub fn trace_id(&self) -> Option<&str> {
        let id = self.traceparent.split('-').nth(1)?;
        (id.len() == 32).then_some(id)
    }
}

/// Every kind of message. One variant per message kind; the doc of each says who sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Body {
    /// Any node → the sender of `seq`: it arrived (perhaps not for the first time).
    /// `new_rows` answers a [`Body::Store`]: how many rows were not already held.
    Ack {
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        new_rows: Option<u32>,
    },
    /// Any node → the sender of every one of `seqs`: they arrived. The acks of query hops,
    /// held back a few milliseconds and sent together (see [`crate::link::Link::accept`]).
    Acks { seqs: Vec<u64> },
    /// Any node → the sender of `seq`: it arrived but will never be handled (unknown command,
    /// a message for another role). Also ends the sender's retransmission.
    Reject { seq: u64, reason: RejectReason },
    /// stormctl → manager.
    Request(ClientRequest),
    /// manager → stormctl.
    Reply(ClientReply),
    /// peer → manager: let me in. Retried until answered. `rejoin` is set by a peer that was
    /// in a ring when its manager restarted: its id and the last view it holds, from which a
    /// new manager rebuilds the cluster.
    Register {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rejoin: Option<Rejoin>,
    },
    /// manager → peer: you are in, under this id.
    Registered { id: PeerId },
    /// manager → peer: you are not (e.g. the name is taken).
    Refused { reason: Refusal },
    /// manager → peers: the ring as of `epoch`.
    Ring(RingView),
    /// a restarted manager → a peer whose rejoin named the view of `epoch` without carrying
    /// it: send it whole ([`Body::HeldView`]).
    ViewWanted { epoch: u64 },
    /// peer → a restarted manager: the view it holds, asked for by [`Body::ViewWanted`].
    HeldView(RingView),
    /// manager → a member that holds the previous view: the ring as of `epoch`, as what
    /// changed since that view (see [`crate::ring_delta`]).
    RingDelta(RingDelta),
    /// peer → manager: every record I no longer own under `epoch` has been handed over
    /// (`handed_over` rows since that view arrived).
    RebalanceDone { epoch: u64, handed_over: u64 },
    /// peer → manager: I want to leave the ring (SIGTERM). The manager answers with a ring that
    /// marks the peer as leaving, then with [`Body::Exit`] once its records are handed over.
    LeaveRequest,
    /// manager → peer: stop; every record you held is elsewhere now (or the cluster is torn down).
    Exit { reason: ExitReason },
    /// manager → peer: report your state (for `status`).
    Probe { probe: u64 },
    /// peer → manager: the answer to a probe.
    Report { probe: u64, report: PeerReport },
    /// manager → a holder of `arcs` (`stormctl repair`): the holders of these arcs of the
    /// settled view of `epoch` do not hold the same rows; send every row of them you hold to
    /// the arc's other holders (who keep what they lack and ignore what they have).
    Resync { epoch: u64, arcs: Vec<u64> },
    /// manager → owner, or peer → peer during hand-off: keep these rows.
    Store(StoreBatch),
    /// manager → entry peer, then peer → next peer: who holds `key`?
    Find(FindEvent),
    /// the peer that ends the walk → manager.
    Found(FindResult),
    /// stormctl → any peer, unsequenced: a query sent straight into the ring. The entry peer
    /// walks it on (peer to peer as `Find`, acknowledged hop by hop, see `Acks`) with the
    /// sender's address as where the answer goes; the client retries a lost one itself.
    Lookup(FindEvent),
    /// the peer that ends a lookup's walk → the client that sent it, unsequenced.
    Answer(FindResult),
    /// a peer → a client, unsequenced: this peer will not take the lookup (not in a ring).
    LookupRefused { query: u64, reason: RejectReason },
    /// stormctl → any peer, unsequenced: several lookups in one datagram (a verify's
    /// multi-get, each key sent to its owner by the client's view). Each is handled as a
    /// `Lookup`; the answers of those this peer ends go back together as `Answers`, the others
    /// walk on one by one.
    Lookups(Vec<FindEvent>),
    /// a peer → a client, unsequenced: the answers of several of its lookups in one datagram.
    Answers(Vec<FindResult>),
    /// peer → manager, unsequenced, every heartbeat interval: I am alive, at this epoch, as
    /// member `id` (absent from older peers). `beat` numbers the peer's heartbeats (absent
    /// from older peers); the answer echoes it.
    Heartbeat {
        epoch: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<PeerId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beat: Option<u64>,
    },
    /// manager → peer, unsequenced: the answer to a heartbeat. `known` is false when this
    /// manager has no such peer (it restarted, or declared the peer dead); the envelope's
    /// sender tells the peer which manager process answered. `id` is the heartbeat's own: an
    /// answer to a heartbeat sent before the peer registered again (delayed, reordered) is
    /// about its earlier membership, and must not send it to register once more. `beat` is
    /// the heartbeat's number: an answer to one sent before the peer's current registration
    /// was accepted (a rejoin keeps its id, so `id` cannot tell) is stale the same way.
    HeartbeatAck {
        known: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<PeerId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beat: Option<u64>,
    },
    /// manager → peer, or peer → peer for an indirect probe, unsequenced: are you there?
    Ping { nonce: u64 },
    /// The answer to a ping, unsequenced; a relay passes it on to the manager.
    Pong { nonce: u64 },
    /// manager → peer, unsequenced: ping `target` for me and pass its pong on (SWIM's
    /// indirect probe: a member the manager cannot hear may still be heard by its neighbours).
    PingReq { nonce: u64, target: SocketAddr },
    /// manager → client, unsequenced, during a long request (a distribute): `done` of
    /// `total` rows so far, for the request whose sequence number is `to`. Losing one costs
    /// nothing; each also tells the client the request is alive.
    Progress { to: u64, done: u64, total: u64 },
    /// Any node → any node: part `index` of `count` of the encoded envelope whose sequence
    /// number is `of`, too large for one datagram (a ring view or a status report of many
    /// peers). Each part is sequenced and acknowledged on its own; the receiver's link puts
    /// the envelope together and hands it on as if it had come in one datagram.
    Fragment {
        of: u64,
        index: u32,
        count: u32,
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

/// What a peer that was in a ring tells a manager it registers with again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejoin {
    pub id: PeerId,
    /// The view the peer holds: whole, or (with `digest`) cut down to its header and this
    /// peer's own entry. Every member of a ring holds the same view, so a manager that
    /// restarts among a thousand peers needs it once, not a thousand times (215 KB each at
    /// 1,024 peers of 16 vnodes): it asks one holder for it ([`Body::ViewWanted`]).
    pub ring: RingView,
    /// Set when `ring` is cut down: the digest ([`crate::ring_delta::digest`]) of the whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<u64>,
}

impl Rejoin {
    /// A rejoin that names `ring` by its digest and carries only the header and member `id`.
    pub fn naming(id: PeerId, ring: &RingView) -> Rejoin {
        let mut own = ring.clone_header();
        own.members
            .extend(ring.members.iter().filter(|m| m.id == id).cloned());
        Rejoin {
            id,
            ring: own,
            digest: Some(crate::ring_delta::digest(ring)),
        }
    }
}

impl RingView {
    /// This view without its members.
    pub fn clone_header(&self) -> RingView {
        RingView {
            epoch: self.epoch,
            settled: self.settled,
            placement: self.placement,
            table_size: self.table_size,
            replication: self.replication,
            settled_epoch: self.settled_epoch,
            members: Vec::new(),
        }
    }
}

impl Body {
    /// A short name for logs and span names.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Ack { .. } => "ack",
            Body::Acks { .. } => "acks",
            Body::Reject { .. } => "reject",
            Body::Request(_) => "request",
            Body::Reply(_) => "reply",
            Body::Register { .. } => "register",
            Body::Registered { .. } => "registered",
            Body::Refused { .. } => "refused",
            Body::Ring(_) => "ring",
            Body::RingDelta(_) => "ring_delta",
            Body::ViewWanted { .. } => "view_wanted",
            Body::HeldView(_) => "held_view",
            Body::RebalanceDone { .. } => "rebalance_done",
            Body::LeaveRequest => "leave_request",
            Body::Exit { .. } => "exit",
            Body::Probe { .. } => "probe",
            Body::Report { .. } => "report",
            Body::Resync { .. } => "resync",
            Body::Store(_) => "store",
            Body::Find(_) => "find_event",
            Body::Found(_) => "found",
            Body::Lookup(_) => "lookup",
            Body::Answer(_) => "answer",
            Body::LookupRefused { .. } => "lookup_refused",
            Body::Lookups(_) => "lookups",
            Body::Answers(_) => "answers",
            Body::Heartbeat { .. } => "heartbeat",
            Body::HeartbeatAck { .. } => "heartbeat_ack",
            Body::Ping { .. } => "ping",
            Body::Pong { .. } => "pong",
            Body::PingReq { .. } => "ping_req",
            Body::Progress { .. } => "progress",
            Body::Fragment { .. } => "fragment",
        }
    }

    /// A query hop: its ack may wait a few milliseconds and leave with others (`Acks`); every
    /// other sequenced message is acknowledged at once (or, a `Store`, with its count).
    pub fn ack_may_wait(&self) -> bool {
        matches!(self, Body::Find(_))
    }

    /// Acks, rejections and the failure detector's messages are fire-and-forget (a lost
    /// heartbeat or ping is itself the information); everything else is sequenced and
    /// acknowledged.
    pub fn is_sequenced(&self) -> bool {
        !matches!(
            self,
            Body::Ack { .. }
                | Body::Acks { .. }
                | Body::Reject { .. }
                | Body::Heartbeat { .. }
                | Body::HeartbeatAck { .. }
                | Body::Ping { .. }
                | Body::Pong { .. }
                | Body::PingReq { .. }
                | Body::Progress { .. }
                | Body::Lookup(_)
                | Body::Answer(_)
                | Body::LookupRefused { .. }
                | Body::Lookups(_)
                | Body::Answers(_)
        )
    }
}

/// The commands of `stormctl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientRequest {
    Setup,
    Distribute {
        #[serde(default)]
        path: Option<String>,
    },
    Query {
        key: RecordKey,
        /// Enter the ring at this peer (name or id); the manager picks one otherwise.
        #[serde(default)]
        via: Option<String>,
        /// How the query travels; the manager's `routing` otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        routing: Option<Routing>,
    },
    Leave {
        name: String,
    },
    Status,
    Teardown,
    /// The current ring view, for a client that sends queries straight to peers.
    Ring,
    /// Anti-entropy, like `nodetool repair`: compare what the holders of every range hold
    /// (rows and a digest of them) and have the holders of ranges that differ copy their rows
    /// to each other.
    Repair,
}

impl ClientRequest {
    pub fn kind(&self) -> &'static str {
        match self {
            ClientRequest::Setup => "setup",
            ClientRequest::Distribute { .. } => "distribute",
            ClientRequest::Query { .. } => "query",
            ClientRequest::Leave { .. } => "leave",
            ClientRequest::Status => "status",
            ClientRequest::Teardown => "teardown",
            ClientRequest::Ring => "ring",
            ClientRequest::Repair => "repair",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientReply {
    /// The sequence number of the request this answers.
    pub to: u64,
    pub result: Result<ReplyBody, RequestError>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplyBody {
    Setup(StatusReport),
    Distribute(DistributeReport),
    Query(QueryOutcome),
    Leave {
        id: PeerId,
        name: String,
        handed_over: u64,
    },
    Status(StatusReport),
    /// The ring, and how queries travel in it unless a query says otherwise.
    Ring {
        view: RingView,
        routing: Routing,
    },
    Teardown {
        peers: u32,
        /// Each peer told to exit, and whether it confirmed.
        #[serde(default)]
        exited: Vec<ExitedPeer>,
    },
    Repair(RepairReport),
}

/// What a `repair` found and asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    /// The settled view compared.
    pub epoch: u64,
    /// Ranges whose every holder reported (the others were not compared).
    pub checked_ranges: u64,
    /// Of those, the ranges whose holders do not hold the same rows.
    pub diverged_ranges: u64,
    /// Ranges left out: a holder did not report, or reported under another view.
    pub unchecked_ranges: u64,
    /// The holders asked to copy their rows of the diverged ranges to the others.
    pub peers_asked: Vec<String>,
}

/// A peer a teardown told to exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitedPeer {
    pub id: PeerId,
    pub name: String,
    pub addr: SocketAddr,
    /// It acknowledged the `Exit` (it is exiting); false when it could not be reached.
    pub confirmed: bool,
}

/// How a query travels from its entry peer to the key's holders.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// Next by next around the ring (O(n) hops): the original design, hop for hop in traces.
    #[default]
    Walk,
    /// Chord's finger tables (O(log n) hops): each hop goes to the farthest finger that does
    /// not pass the key; from the owner on, and around any peer that does not answer, the walk.
    Fingers,
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Routing::Walk => "walk",
            Routing::Fingers => "fingers",
        })
    }
}

/// How keys map to owners: chosen in the manager's configuration (`placement`) and carried in
/// every ring view, so that every peer decides ownership the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// Consistent hashing: each peer owns the arc of the hash ring that ends at its token.
    Consistent,
    /// The seed's scheme: `hash(key) mod n` picks the n-th peer of the ring.
    Modulo,
    /// The networking course's: `pos = id mod s` (s = [`RingView::table_size`], the first prime
    /// above twice the record count), owner `pos mod n`.
    Course,
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placement::Consistent => "consistent",
            Placement::Modulo => "modulo",
            Placement::Course => "course",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: PeerId,
    pub name: String,
    pub addr: SocketAddr,
    /// Position on the hash ring; members are ordered by it.
    pub token: u64,
    /// Still walked by queries, but owns nothing: its records are being handed over.
    pub leaving: bool,
    /// More positions on the hash ring (virtual nodes): the member owns the arc ending at each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vnodes: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingView {
    pub epoch: u64,
    /// False while records are moving after a membership change: a query that misses at the
    /// owner keeps walking instead of answering "not found".
    pub settled: bool,
    pub placement: Placement,
    /// The course placement's table size `s` (fixed when records are distributed); unused by
    /// the other placements.
    #[serde(default)]
    pub table_size: u64,
    /// Copies of every record: its owner and the next `replication - 1` owning members.
    #[serde(default = "one")]
    pub replication: u32,
    /// The newest settled epoch (this view's own when it is settled): every member then held
    /// what that view placed on it, and no member drops a row until the next settled view.
    /// Repair plans compare against it, a view every member completed, not one that only the
    /// planning peer finished (a member may have given a row up in a view it never saw).
    /// 0: unknown (an older manager), so plans send every row to every other holder.
    #[serde(default)]
    pub settled_epoch: u64,
    /// Ordered by token: each member's next neighbour is the one after it, wrapping.
    pub members: Vec<Member>,
}

fn one() -> u32 {
    1
}

/// Rows of one schema, batched into one datagram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreBatch {
    pub epoch: u64,
    /// Lower-cased CSV column names, shared by every row of the batch.
    pub columns: Vec<String>,
    pub rows: Vec<WireRow>,
}

/// One CSV row: its key and its values packed in one byte string (no field names per row).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRow(pub RecordKey, pub PackedRow);

/// A row's values in one buffer, each as its length (LEB128) then its UTF-8 bytes: one
/// allocation per row in a datagram and in a peer's store, instead of one per field. It travels
/// as one CBOR byte string and is checked when decoded (lengths that fit, valid UTF-8).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PackedRow(Box<[u8]>);

/// Why bytes are not a packed row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed packed row at byte {at}")]
pub struct PackedRowError {
    pub at: usize,
}

impl PackedRow {
    pub fn pack<S: AsRef<str>>(values: &[S]) -> PackedRow {
        let size = values.iter().map(|v| v.as_ref().len() + 2).sum();
        Self::pack_utf8(values.iter().map(|v| v.as_ref().as_bytes()), size)
    }

    /// Packs fields that are UTF-8 already (checked by the CSV reader): one allocation, the
    /// fields copied once.
    pub(crate) fn pack_utf8<'a>(fields: impl Iterator<Item = &'a [u8]>, size: usize) -> PackedRow {
        let mut out = Vec::with_capacity(size);
        for v in fields {
            let mut n = v.len() as u64;
            loop {
                let byte = (n & 0x7f) as u8;
                n >>= 7;
                if n == 0 {
                    out.push(byte);
                    break;
                }
                out.push(byte | 0x80);
            }
            out.extend_from_slice(v);
        }
        PackedRow(out.into_boxed_slice())
    }

    /// The value of column `i`.
    pub fn field(&self, i: usize) -> Option<&str> {
        self.fields().nth(i)
    }

    /// Checks `bytes` (from the network) and takes them as a row.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<PackedRow, PackedRowError> {
        let row = PackedRow(bytes.into_boxed_slice());
        // A row all ASCII (NOAA's are, length prefixes included while fields are shorter than
        // 128 bytes) has every field UTF-8 wherever its bounds fall: one pass over the bytes
        // instead of a check per field (a hundred per record, on every answer a client reads).
        let ascii = row.0.is_ascii();
        let mut at = 0;
        while at < row.0.len() {
            let (len, body) = row.field_at(at).ok_or(PackedRowError { at })?;
            if !ascii {
                std::str::from_utf8(&row.0[body..body + len]).map_err(|_| PackedRowError { at })?;
            }
            at = body + len;
        }
        Ok(row)
    }

    /// The length and start of the field whose length prefix is at `at`.
    fn field_at(&self, mut at: usize) -> Option<(usize, usize)> {
        let mut len = 0usize;
        for shift in (0..64).step_by(7) {
            let byte = *self.0.get(at)?;
            at += 1;
            len |= ((byte & 0x7f) as usize) << shift;
            if byte & 0x80 == 0 {
                return (at.checked_add(len)? <= self.0.len()).then_some((len, at));
            }
        }
        None
    }

    /// The values, in column order.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        let mut at = 0;
        std::iter::from_fn(move || {
            let (len, body) = self.field_at(at)?;
            at = body + len;
            // Checked when packed or received: never invalid here.
            std::str::from_utf8(&self.0[body..body + len]).ok()
        })
    }

    pub fn values(&self) -> Vec<String> {
        self.fields().map(str::to_string).collect()
    }

    /// The packed bytes (length-prefixed values), as they travel and as a store keeps them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Bytes a store keeps, that were checked when they arrived ([`PackedRow::from_bytes`])
    /// or were packed here.
    pub(crate) fn from_checked(bytes: &[u8]) -> PackedRow {
        PackedRow(bytes.into())
    }

    /// Bytes of the packed values.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for PackedRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.fields()).finish()
    }
}

impl Serialize for PackedRow {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::Bytes::new(&self.0).serialize(s)
    }
}

impl<'de> Deserialize<'de> for PackedRow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?.into_vec();
        PackedRow::from_bytes(bytes).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindEvent {
    /// The manager's query number.
    pub query: u64,
    pub key: RecordKey,
    /// Peers visited so far, in hop order; the receiver appends itself.
    pub path: Vec<PeerId>,
    /// When each hop received the query (wall clock, µs since the Unix epoch), in hop order:
    /// the query's own timeline, for `stormctl query --trace` without Jaeger.
    #[serde(default)]
    pub hops: Vec<HopTiming>,
    #[serde(default)]
    pub routing: Routing,
    /// Where the answer goes when it is not the manager: the address a `Lookup` came from,
    /// set by the entry peer (never taken from the datagram's body, so a stranger cannot aim
    /// answers at a third party).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopTiming {
    pub peer: PeerId,
    pub at_us: u64,
}

/// One hop of a query's walk, as the client sees it: who, where, and when, in µs after the
/// manager sent the query into the ring.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HopOut {
    pub peer: PeerId,
    pub name: String,
    pub addr: Option<SocketAddr>,
    pub at_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindResult {
    pub query: u64,
    pub key: RecordKey,
    pub found: bool,
    pub records: Vec<RecordOut>,
    pub path: Vec<PeerId>,
    /// Some rows were left out to fit the datagram.
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub hops: Vec<HopTiming>,
    /// Not found, but not every live holder of the key was asked: the walk hit its hop bound
    /// or could reach no other member (a lossy network, dead peers not yet routed around).
    /// Not a final miss: the asker tries again.
    #[serde(default)]
    pub unreached: bool,
}

/// A stored row with its column names, as returned by a query: names and values each packed
/// in one byte string, so that an answer decodes with two allocations per row rather than one
/// per field (decoding answers was a fifth of a client's CPU per query).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordOut {
    pub columns: PackedRow,
    pub values: PackedRow,
}

impl RecordOut {
    pub fn new<S: AsRef<str>>(columns: &[S], values: PackedRow) -> RecordOut {
        RecordOut {
            columns: PackedRow::pack(columns),
            values,
        }
    }

    /// (column name, value) in column order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.columns.fields().zip(self.values.fields())
    }

    /// The value of the column `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs().find(|(c, _)| *c == name).map(|(_, v)| v)
    }

    /// Whether this is exactly the row `values` under the columns `columns`.
    pub fn is<S: AsRef<str>>(&self, columns: &[S], values: &PackedRow) -> bool {
        self.columns.fields().eq(columns.iter().map(AsRef::as_ref))
            && self.values.fields().eq(values.fields())
    }

    /// A record of `columns` and `values`, packed (as a store keeps them: checked when they
    /// were stored).
    pub(crate) fn from_packed(columns: &[u8], values: &[u8]) -> RecordOut {
        RecordOut {
            columns: PackedRow::from_checked(columns),
            values: PackedRow::from_checked(values),
        }
    }

    /// An upper bound on its encoded size.
    pub fn encoded_size(&self) -> usize {
        Self::encoded_size_of(self.columns.as_bytes(), self.values.as_bytes())
    }

    /// An upper bound on the encoded size of a record of `columns` and `values` (packed).
    pub fn encoded_size_of(columns: &[u8], values: &[u8]) -> usize {
        32 + columns.len() + values.len()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryOutcome {
    pub key: RecordKey,
    pub found: bool,
    pub records: Vec<RecordOut>,
    pub path: Vec<PeerId>,
    /// Names of the peers on `path`, in the same order.
    pub path_names: Vec<String>,
    #[serde(default)]
    pub truncated: bool,
    /// From the manager sending the query into the ring to the answer, in microseconds.
    pub ring_micros: u64,
    /// The walk's timeline.
    #[serde(default)]
    pub hops: Vec<HopOut>,
}

impl QueryOutcome {
    /// What a client is told of `result`: a query sent at `sent_us` (on the wall clock, as the
    /// peers stamp their hops) and answered `ring_micros` later; the peers on its path named
    /// by `name_of` and placed by `addr_of`.
    pub fn from_result(
        result: FindResult,
        sent_us: u64,
        ring_micros: u64,
        name_of: impl Fn(PeerId) -> String,
        addr_of: impl Fn(PeerId) -> Option<SocketAddr>,
    ) -> QueryOutcome {
        let hops = result
            .hops
            .iter()
            .map(|h| HopOut {
                peer: h.peer,
                name: name_of(h.peer),
                addr: addr_of(h.peer),
                at_us: h.at_us.saturating_sub(sent_us),
            })
            .collect();
        QueryOutcome {
            key: result.key,
            found: result.found,
            records: result.records,
            path_names: result.path.iter().map(|id| name_of(*id)).collect(),
            path: result.path,
            truncated: result.truncated,
            ring_micros,
            hops,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerReport {
    pub records: u64,
    pub keys: u64,
    pub epoch: u64,
    /// Records waiting to be copied or handed over to other replicas.
    pub handing_over: u64,
    #[serde(default)]
    pub counters: Counters,
    /// Of `records`, those this peer owns (first replica) and those it keeps as a replica.
    #[serde(default)]
    pub owned: u64,
    #[serde(default)]
    pub replicas: u64,
    /// Rows held per arc (its end token under consistent hashing, else its owner id): how the
    /// manager counts copies.
    #[serde(default)]
    pub ranges: Vec<(u64, u64)>,
    /// A digest of the rows of each arc of `ranges`, in the same order ([`crate::store::row_digest`]
    /// summed): holders of an arc that hold the same rows report the same digest. Empty from
    /// older peers.
    #[serde(default)]
    pub digests: Vec<u64>,
}

impl PeerReport {
    /// The rows this peer reported of `arc`, and their digest if it sent digests.
    pub fn range(&self, arc: u64) -> Option<(u64, Option<u64>)> {
        let i = self.ranges.iter().position(|(a, _)| *a == arc)?;
        Some((self.ranges[i].1, self.digests.get(i).copied()))
    }
}

/// What a node has had to cope with since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Datagrams sent again because no acknowledgement came in time.
    pub retransmits: u64,
    /// Datagrams received that did not decode (counted and dropped).
    pub bad_datagrams: u64,
    /// Copies of datagrams already handled (acknowledged again, not handled twice).
    pub duplicates: u64,
    /// Datagrams without a valid cluster-key tag (dropped unanswered).
    #[serde(default)]
    pub unauthenticated: u64,
    /// Messages too large for one datagram, sent in fragments (ring views and status
    /// reports of large clusters, rejoins carrying such a view).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fragmented: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: PeerId,
    pub name: String,
    pub addr: SocketAddr,
    pub state: PeerState,
    /// None when the peer did not answer the probe.
    pub records: Option<u64>,
    pub keys: Option<u64>,
    pub token: Option<u64>,
    /// The fraction of the key space this peer owns.
    pub share: f64,
    /// None when the peer did not answer the probe.
    #[serde(default)]
    pub counters: Option<Counters>,
    /// Rows it owns, and rows it keeps as a replica of another's range.
    #[serde(default)]
    pub owned: Option<u64>,
    #[serde(default)]
    pub replicas: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub epoch: u64,
    pub settled: bool,
    pub placement: Option<Placement>,
    /// The course placement's table size, when that is the placement.
    #[serde(default)]
    pub table_size: u64,
    pub peers: Vec<PeerStatus>,
    /// The manager's own.
    #[serde(default)]
    pub manager: Counters,
    #[serde(default = "one")]
    pub replication: u32,
    /// Ranges (one per owner) where some replica holds fewer rows than another, or that have
    /// fewer than `replication` live holders; and the copies missing in them.
    #[serde(default)]
    pub under_replicated_ranges: u64,
    #[serde(default)]
    pub under_replicated_rows: u64,
    /// Rows still being copied by a repair or a hand-off.
    #[serde(default)]
    pub repairing: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistributeReport {
    pub path: String,
    pub format: String,
    /// Data rows read from the file, good and bad.
    pub read: u64,
    /// Rows acknowledged by their owners.
    pub stored: u64,
    /// Of `stored`, rows the owner did not hold already.
    pub new_rows: u64,
    pub rejected: u64,
    /// The first few rejected rows: (line, reason).
    pub rejected_samples: Vec<(u64, String)>,
    pub fallback_keys: u64,
    pub batches: u64,
    pub per_peer: Vec<(PeerId, u64)>,
    pub elapsed_micros: u64,
}

/// A peer's state as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerState {
    /// Registered, not yet in the ring (no `setup` yet).
    Registered,
    Up,
    /// Handing its records over before it exits.
    Leaving,
    /// Did not answer the status probe.
    Unreachable,
    /// Silent past the suspicion timeout: probed directly and through other peers.
    Suspect,
    /// Declared dead by the failure detector and removed from the ring.
    Dead,
}

impl PeerState {
    /// The two-letter code of `status`'s table, after `nodetool status`.
    pub fn code(self) -> &'static str {
        match self {
            PeerState::Registered => "UR",
            PeerState::Up => "UN",
            PeerState::Leaving => "UL",
            PeerState::Unreachable => "DN",
            PeerState::Suspect => "SN",
            PeerState::Dead => "DD",
        }
    }
}

impl std::fmt::Display for PeerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerState::Registered => "registered",
            PeerState::Up => "up",
            PeerState::Leaving => "leaving",
            PeerState::Unreachable => "unreachable",
            PeerState::Suspect => "suspect",
            PeerState::Dead => "dead",
        })
    }
}

/// Why a sequenced message will never be handled (it is answered with [`Body::Reject`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RejectReason {
    #[error("protocol version {got} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version { got: u16 },
    #[error("unknown or malformed message: {detail}")]
    Malformed { detail: String },
    #[error("the manager does not handle '{kind}' messages")]
    NotForManager { kind: String },
    #[error("a peer does not handle '{kind}' messages")]
    NotForPeer { kind: String },
    #[error("'{kind}' is a client command: send it to the manager, not to peer {peer}")]
    ClientCommandToPeer { kind: String, peer: String },
    #[error("peer {peer} is not in the ring yet")]
    NotInRing { peer: String },
    #[error("not a registered peer")]
    NotRegistered,
}

/// Why the manager refused a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error(
        "a peer name must not be empty: set `name` (STORM_NAME), or leave it unset to use the host name"
    )]
    EmptyName,
    #[error(
        "the name '{name}' is taken by peer {id} at {addr}: give this peer another name (STORM_NAME), or wait until the old one is declared dead"
    )]
    NameTaken {
        name: String,
        id: PeerId,
        addr: SocketAddr,
    },
    /// The cluster has its most peers, or one more would make the ring view (or the status
    /// report) larger than the manager sends: every member is sent the whole view.
    #[error(
        "the cluster is full: {peers} peers at {vnodes} tokens each (vnodes); a cluster holds at most 1,024 peers, and one more must not make the ring view or the status report larger than 1 MiB, nor a ring change send more than 256 MiB of views to its members; run the manager with fewer vnodes (STORM_VNODES) or start fewer peers"
    )]
    ClusterFull { peers: usize, vnodes: u32 },
}

/// Why the manager tells a peer to exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ExitReason {
    #[error("the cluster is being torn down")]
    TearDown,
    #[error("left the ring; its records are with their new owners")]
    Left,
    #[error("left before joining the ring")]
    LeftBeforeJoining,
}

/// Why a distribute stopped before every row was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DistributeFailure {
    #[error("peer {peer} refused a batch: {reason}")]
    BatchRefused { peer: PeerId, reason: RejectReason },
    #[error(
        "peer {peer} at {addr} did not acknowledge after {attempts} attempts (is it down? see stormctl status)"
    )]
    PeerSilent {
        peer: PeerId,
        addr: SocketAddr,
        attempts: u32,
    },
    /// Rows were placed on a peer the manager no longer lists (gone between placing and
    /// sending); they were not sent anywhere.
    #[error(
        "peer {peer} is no longer in the cluster and rows placed on it were not sent: run distribute again once the ring is rebuilt (rows already stored are kept)"
    )]
    PeerGone { peer: PeerId },
}

/// Why the manager could not carry out a client's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum RequestError {
    #[error(
        "no peers have registered yet: start peers (stormd with role = peer and manager = this manager's address), then run setup"
    )]
    NoPeers,
    #[error("no ring yet: run setup first")]
    NoRing,
    #[error("a teardown is in progress: wait for it to answer, then start peers and run setup")]
    TeardownInProgress,
    #[error("the cluster was torn down: start peers again, then run setup and distribute")]
    TornDown,
    #[error("a distribute is already running: wait for its report, then try again")]
    DistributeRunning,
    #[error(
        "the ring is changing (a join, a leave, or the repair of a dead peer's ranges): try again once status shows it settled"
    )]
    Unsettled,
    #[error(
        "no file given and no `data` configured: pass --file PATH (as the manager sees it) or set `data` in the manager's configuration"
    )]
    NoData,
    #[error("{reason}")]
    Load { path: String, reason: String },
    #[error(
        "{failure}; {stored} of {read} rows were stored before the failure (distributing again is safe: nothing is stored twice)"
    )]
    Distribute {
        failure: DistributeFailure,
        stored: u64,
        read: u64,
    },
    #[error("busy: {in_flight} queries are in flight; try again")]
    Busy { in_flight: usize },
    #[error("busy: {in_flight} status requests are in flight; try again")]
    StatusBusy { in_flight: usize },
    #[error("no peer is named '{name}': stormctl status lists the names")]
    NoSuchPeer { name: String },
    #[error("no peer '{name}' in the ring: it has not joined it yet (run setup) or has left it")]
    NotInRing { name: String },
    #[error("peer '{name}' is already leaving: stormctl status shows when its hand-off is done")]
    AlreadyLeaving { name: String },
    #[error(
        "peer {id} ({name}) stopped answering and was removed from the ring; records it held are lost unless another replica holds them (replication > 1)"
    )]
    PeerLost { id: PeerId, name: String },
    #[error(
        "no answer from the ring within {secs:.1} s (event {key}): try again; if it persists, stormctl status shows unreachable peers (on a lossy network raise query_timeout_ms)"
    )]
    QueryTimeout { key: RecordKey, secs: f64 },
    #[error(
        "no peer in the ring could take the query (last: {last}) (event {key}): stormctl status shows which peers are up"
    )]
    NoEntry { key: RecordKey, last: String },
    #[error(
        "the manager restarted and is rebuilding the ring from its peers; try again in a few seconds"
    )]
    Recovering,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("{0} bytes exceed the limit (one datagram, or a message sent in fragments)")]
    TooLarge(usize),
    #[error("not a stormdht envelope: {0}")]
    Malformed(String),
    #[error("protocol version {got} is not supported (this build speaks {PROTOCOL_VERSION})")]
    Version { got: u16 },
    #[error("{0} trailing bytes after the envelope")]
    Trailing(usize),
    #[error("could not encode {kind}: {reason}")]
    Encode { kind: &'static str, reason: String },
}

/// Just enough of an envelope to answer one whose body this build does not understand.
#[derive(Debug, Deserialize)]
pub struct EnvelopeHeader {
    pub v: u16,
    pub from: u64,
    pub seq: u64,
}

/// The bytes `value` takes in CBOR (usize::MAX if it cannot be encoded).
pub fn cbor_len<T: Serialize>(value: &T) -> usize {
    let mut out = Vec::new();
    ciborium::ser::into_writer(value, &mut out).map_or(usize::MAX, |_| out.len())
}

thread_local! {
    /// The decoder's scratch space, made once per thread: `ciborium::de::from_reader` zeroes a
    /// fresh 4 KiB array for every datagram, 7% of a peer's CPU per query. Its contents are
    /// never read before they are written.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 4096]);
}

thread_local! {
    static ENCODE_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The largest encode buffer kept between messages: a query's answer fits; a 60 KB batch's
/// buffer is not kept (a peer holding 25 KB of rows would keep more than that for good).
const ENCODE_BUFFER_KEEP: usize = 4_096;

/// Runs `decode` with this thread's scratch space (a fresh one if it is in use, as when a
/// decoder calls back into another).
fn with_scratch<T>(decode: impl FnOnce(&mut [u8]) -> T) -> T {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => decode(&mut scratch),
        Err(_) => decode(&mut [0; 4096]),
    })
}

impl Envelope {
    pub fn new(from: u64, seq: u64, trace: Option<TraceContext>, body: Body) -> Self {
        Envelope {
            v: PROTOCOL_VERSION,
            from,
            seq,
            trace,
            body,
        }
    }

    /// Encodes one datagram.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        self.encode_within(MAX_UDP_PAYLOAD)
    }

    /// Encodes an envelope of at most `limit` bytes (a message the link may send in
    /// fragments: up to [`MAX_MESSAGE`]).
    pub fn encode_within(&self, limit: usize) -> Result<Vec<u8>, WireError> {
        encode_buffered(limit, |out| {
            // A query's messages without serde (the same bytes), the rest through it.
            if crate::quick_codec::encode_into(self, out) {
                return Ok(());
            }
            self.encode_general(out)
        })
    }

    /// The bytes of `Envelope::new(from, seq, trace, Body::Find(find))` (at most `limit`),
    /// from a borrowed `find`: what a hop's sender sends while it keeps the `FindEvent`.
    pub fn encode_find(
        from: u64,
        seq: u64,
        trace: Option<&TraceContext>,
        find: &FindEvent,
        limit: usize,
    ) -> Result<Vec<u8>, WireError> {
        encode_buffered(limit, |out| {
            if crate::quick_codec::encode_find_into((PROTOCOL_VERSION, from, seq), trace, find, out)
            {
                return Ok(());
            }
            // Not a shape the quick codec writes (it writes every one): as any envelope.
            Envelope::new(from, seq, trace.cloned(), Body::Find(find.clone())).encode_general(out)
        })
    }

    /// The bytes of `Envelope::new(from, UNSEQUENCED, None, Body::Answer(result))` with
    /// `records` (packed column names, packed values) as the result's records: what a peer
    /// answers a client with, its rows borrowed from its store.
    pub fn encode_answer(
        from: u64,
        result: &FindResult,
        records: &[(&[u8], &[u8])],
    ) -> Result<Vec<u8>, WireError> {
        encode_buffered(MAX_UDP_PAYLOAD, |out| {
            if crate::quick_codec::encode_answer_into(
                (PROTOCOL_VERSION, from),
                result,
                records,
                out,
            ) {
                return Ok(());
            }
            // Not a shape the quick codec writes (it writes every one): as any envelope.
            let mut owned = result.clone();
            owned.records = records
                .iter()
                .map(|&(columns, values)| RecordOut::from_packed(columns, values))
                .collect();
            Envelope::new(from, UNSEQUENCED, None, Body::Answer(owned)).encode_general(out)
        })
    }

    /// Encodes into `out` (cleared first) through serde: every message the quick codec does
    /// not write.
    fn encode_general(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.clear();
        ciborium::ser::into_writer(self, &mut *out).map_err(|e| WireError::Encode {
            kind: self.body.kind(),
            reason: e.to_string(),
        })
    }
}

/// Encodes by `write` into this thread's buffer, then copies the bytes out at their size: one
/// allocation, where a vector growing as ciborium writes took up to four, each moving the bytes
/// so far (a query's answer is 1.5 KB), and a retransmission buffer would keep the slack.
fn encode_buffered(
    limit: usize,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), WireError>,
) -> Result<Vec<u8>, WireError> {
    ENCODE_BUFFER.with(|cell| {
        let mut fresh = Vec::new();
        let mut borrowed = cell.try_borrow_mut();
        let out = match borrowed.as_deref_mut() {
            Ok(buffer) => buffer,
            Err(_) => &mut fresh,
        };
        write(out)?;
        if out.len() > limit {
            return Err(WireError::TooLarge(out.len()));
        }
        let bytes = out.to_vec();
        // A buffer grown by a large message (a batch, a view) is not kept.
        if out.capacity() > ENCODE_BUFFER_KEEP {
            *out = Vec::new();
        }
        Ok(bytes)
    })
}

impl Envelope {
    /// Decodes one datagram. The version is checked before the body, so a newer peer gets a
    /// clear "unsupported version" rather than a confusing decode error.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, WireError> {
        Self::decode_within(bytes, MAX_UDP_PAYLOAD)
    }

    /// Decodes an envelope of at most `limit` bytes (one put together from fragments).
    pub fn decode_within(bytes: &[u8], limit: usize) -> Result<Envelope, WireError> {
        if bytes.len() > limit {
            return Err(WireError::TooLarge(bytes.len()));
        }
        // A query's messages first, read without serde (a third of a query's CPU went to
        // decoding); anything else, or any doubt, goes the general way.
        if let Some(env) = crate::quick_codec::envelope(bytes) {
            if env.v != PROTOCOL_VERSION {
                return Err(WireError::Version { got: env.v });
            }
            return Ok(env);
        }
        // Declared lengths must fit the datagram before serde sees them (bounded allocation).
        crate::cbor_guard::check(bytes).map_err(|e| match e {
            crate::cbor_guard::GuardError::Trailing(n) => WireError::Trailing(n),
            e => WireError::Malformed(e.to_string()),
        })?;
        let mut reader = bytes;
        match with_scratch(|scratch| {
            ciborium::de::from_reader_with_buffer::<Envelope, _>(&mut reader, scratch)
        }) {
            Ok(envelope) => {
                if envelope.v != PROTOCOL_VERSION {
                    return Err(WireError::Version { got: envelope.v });
                }
                if !reader.is_empty() {
                    return Err(WireError::Trailing(reader.len()));
                }
                Ok(envelope)
            }
            Err(e) => match Self::decode_header(bytes) {
                Some(h) if h.v != PROTOCOL_VERSION => Err(WireError::Version { got: h.v }),
                _ => Err(WireError::Malformed(e.to_string())),
            },
        }
    }

    /// The header of a datagram whose body did not decode, if the header itself is readable.
    pub fn decode_header(bytes: &[u8]) -> Option<EnvelopeHeader> {
        crate::cbor_guard::check(bytes).ok()?;
        ciborium::de::from_reader::<EnvelopeHeader, _>(bytes).ok()
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn packed_rows_round_trip_and_refuse_malformed_bytes() {
        let values = ["5570068", "", "OHIO", &"x".repeat(300), "Zürich"];
        let row = PackedRow::pack(&values);
        assert_eq!(row.values(), values);
        let bytes = row.0.to_vec();
        assert_eq!(PackedRow::from_bytes(bytes.clone()), Ok(row.clone()));
        // A length running past the end, a truncated length, bad UTF-8.
        assert!(PackedRow::from_bytes(vec![5, b'a']).is_err());
        assert!(PackedRow::from_bytes(vec![0x80]).is_err());
        assert!(PackedRow::from_bytes(vec![2, 0xff, 0xfe]).is_err());
        assert!(PackedRow::from_bytes(vec![0xff; 11]).is_err());
        // All ASCII (checked in one pass), and not: a lone lead byte inside a field.
        let ascii = PackedRow::pack(&["5570068", "OHIO"]);
        assert_eq!(PackedRow::from_bytes(ascii.0.to_vec()), Ok(ascii));
        assert!(PackedRow::from_bytes(vec![1, b'a', 3, b'b', 0xc3, b'c']).is_err());
        // Every truncation of a valid row either is a valid row or an error, never a panic.
        for cut in 0..bytes.len() {
            let _ = PackedRow::from_bytes(bytes[..cut].to_vec());
        }
        // In an envelope: a malformed row makes the datagram undecodable.
        let mut batch = Envelope::new(
            1,
            2,
            None,
            Body::Store(StoreBatch {
                epoch: 1,
                columns: vec!["a".into()],
                rows: vec![WireRow(RecordKey::Event(1), PackedRow::pack(&["ab"]))],
            }),
        )
        .encode()
        .unwrap();
        let at = batch.windows(3).position(|w| w == [2, b'a', b'b']).unwrap();
        batch[at] = 9;
        assert!(Envelope::decode(&batch).is_err());
    }

    use super::*;

    fn sample_bodies() -> Vec<Body> {
        let addr: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        vec![
            Body::Ack {
                seq: 7,
                new_rows: Some(3),
            },
            Body::Acks {
                seqs: vec![3, 4, 70_000],
            },
            Body::Reject {
                seq: 2,
                reason: RejectReason::NotRegistered,
            },
            Body::Request(ClientRequest::Query {
                key: RecordKey::Event(5570068),
                via: Some("p1".into()),
                routing: None,
            }),
            Body::Request(ClientRequest::Distribute { path: None }),
            Body::Register {
                name: "peer-a".into(),
                rejoin: None,
            },
            Body::Heartbeat {
                epoch: 4,
                id: Some(2),
                beat: Some(17),
            },
            Body::PingReq {
                nonce: 3,
                target: addr,
            },
            Body::Ring(RingView {
                epoch: 3,
                settled: true,
                placement: Placement::Course,
                table_size: 97,
                replication: 2,
                settled_epoch: 0,
                members: vec![Member {
                    id: 1,
                    name: "a".into(),
                    addr,
                    token: u64::MAX,
                    leaving: false,
                    vnodes: Vec::new(),
                }],
            }),
            Body::Store(StoreBatch {
                epoch: 1,
                columns: vec!["event_id".into(), "state".into()],
                rows: vec![WireRow(
                    RecordKey::Fallback(0xdead_beef),
                    PackedRow::pack(&["", "OHIO"]),
                )],
            }),
            Body::Find(FindEvent {
                query: 9,
                key: RecordKey::Event(1),
                path: vec![1, 2],
                hops: vec![HopTiming {
                    peer: 1,
                    at_us: 1_700_000_000_000_000,
                }],
                routing: crate::wire::Routing::Fingers,
                reply_to: Some(SocketAddr::from(([127, 0, 0, 1], 4000))),
            }),
            Body::Lookup(FindEvent {
                query: 10,
                key: RecordKey::Event(2),
                path: Vec::new(),
                hops: Vec::new(),
                routing: crate::wire::Routing::Walk,
                reply_to: None,
            }),
            Body::Answer(FindResult {
                query: 10,
                key: RecordKey::Event(2),
                found: true,
                records: vec![RecordOut::new(&["EVENT_ID"], PackedRow::pack(&["2"]))],
                path: vec![3],
                truncated: false,
                hops: Vec::new(),
                unreached: false,
            }),
            Body::LookupRefused {
                query: 10,
                reason: RejectReason::NotInRing { peer: "p1".into() },
            },
            Body::Lookups(vec![
                FindEvent {
                    query: 11,
                    key: RecordKey::Event(3),
                    path: Vec::new(),
                    hops: Vec::new(),
                    routing: crate::wire::Routing::Walk,
                    reply_to: None,
                },
                FindEvent {
                    query: 12,
                    key: RecordKey::Fallback(0x00ff),
                    path: Vec::new(),
                    hops: Vec::new(),
                    routing: crate::wire::Routing::Fingers,
                    reply_to: None,
                },
            ]),
            Body::Answers(vec![FindResult {
                query: 11,
                key: RecordKey::Event(3),
                found: false,
                records: Vec::new(),
                path: vec![1, 2],
                truncated: false,
                hops: Vec::new(),
                unreached: false,
            }]),
            Body::Reply(ClientReply {
                to: 4,
                result: Err(RequestError::AlreadyLeaving { name: "p1".into() }),
            }),
            Body::LeaveRequest,
        ]
    }

    #[test]
    fn every_body_round_trips_with_and_without_trace() {
        let trace = TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: Some("k=v".into()),
        };
        for (i, body) in sample_bodies().into_iter().enumerate() {
            for t in [None, Some(trace.clone())] {
                let env = Envelope::new(42, i as u64 + 1, t, body.clone());
                let bytes = env.encode().unwrap();
                assert_eq!(Envelope::decode(&bytes).unwrap(), env);
            }
        }
    }

    #[test]
    fn trace_id_is_read_from_traceparent() {
        let t = TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            tracestate: None,
        };
        assert_eq!(t.trace_id(), Some("0af7651916cd43dd8448eb211c80319c"));
        let bad = TraceContext {
            traceparent: "garbage".into(),
            tracestate: None,
        };
        assert_eq!(bad.trace_id(), None);
    }

    #[test]
    fn other_version_is_named_in_the_error() {
        let mut env = Envelope::new(1, 1, None, Body::LeaveRequest);
        env.v = 99;
        let bytes = env.encode().unwrap();
        assert_eq!(
            Envelope::decode(&bytes),
            Err(WireError::Version { got: 99 })
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = Envelope::new(1, 1, None, Body::LeaveRequest)
            .encode()
            .unwrap();
        bytes.push(0);
        assert_eq!(Envelope::decode(&bytes), Err(WireError::Trailing(1)));
    }

    #[test]
    fn unknown_body_keeps_a_readable_header() {
        #[derive(Serialize)]
        struct Alien {
            v: u16,
            from: u64,
            seq: u64,
            body: &'static str,
        }
        let mut bytes = Vec::new();
        ciborium::ser::into_writer(
            &Alien {
                v: PROTOCOL_VERSION,
                from: 3,
                seq: 8,
                body: "Frobnicate",
            },
            &mut bytes,
        )
        .unwrap();
        assert!(matches!(
            Envelope::decode(&bytes),
            Err(WireError::Malformed(_))
        ));
        let header = Envelope::decode_header(&bytes).unwrap();
        assert_eq!((header.from, header.seq), (3, 8));
    }

    /// Deterministic garbage from the tests' one seeded generator.
    fn garbage(rng: &mut rand::rngs::SmallRng, len: usize) -> Vec<u8> {
        use rand::Rng;
        (0..len).map(|_| rng.random()).collect()
    }

    #[test]
    fn random_and_mutated_bytes_never_panic() {
        let mut seed: rand::rngs::SmallRng =
            rand::SeedableRng::seed_from_u64(0x9e37_79b9_7f4a_7c15);
        for len in 0..300 {
            let _ = Envelope::decode(&garbage(&mut seed, len));
        }
        // Valid envelopes with bytes flipped and truncated hit the deeper decoder paths.
        for body in sample_bodies() {
            let bytes = Envelope::new(5, 5, None, body).encode().unwrap();
            for cut in 0..bytes.len() {
                let _ = Envelope::decode(&bytes[..cut]);
            }
            for i in 0..bytes.len() {
                let mut m = bytes.clone();
                m[i] ^= garbage(&mut seed, 1)[0] | 1;
                let _ = Envelope::decode(&m);
            }
        }
    }

    #[test]
    fn huge_declared_lengths_fail_cleanly() {
        // A map header then a text string claiming 2^32 bytes. That decoding also allocates no
        // more than a small multiple of the datagram is checked in tests/decode_alloc.rs.
        let bytes = [0xa1, 0x7b, 0, 0, 0, 1, 0, 0, 0, 0, 0x61, 0x41];
        assert!(Envelope::decode(&bytes).is_err());
        // An array claiming 2^63 elements.
        let bytes = [0x9b, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert!(Envelope::decode(&bytes).is_err());
    }
}
