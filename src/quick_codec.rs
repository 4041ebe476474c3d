//! A decoder and an encoder for the messages on a query's path (`Lookup`, `Find`, `Answer`,
//! `Found`, the hop's `Ack`, and a verify's `Lookups` and `Answers`), in the exact shape
//! ciborium gives them, tried before serde.
//!
//! Decoding was the largest part of a query's own work: a 85-byte lookup took 1.1 µs through
//! the guard's walk and serde's visitors, a 386-byte answer 2.3 µs (each field name read,
//! checked as UTF-8 and matched; every item pulled through ciborium's header conversions),
//! about a third of a peer's and two fifths of a client's CPU per query. This reader takes the
//! fields in the order ciborium writes them and compares names as bytes.
//!
//! It never decides anything alone: whatever is not exactly that shape (another field order, an
//! unknown or missing field, a tag, an indefinite length, a value out of range, trailing bytes)
//! gives `None`, and the datagram goes to the general decoder, which accepts or refuses it as
//! before. So where this reader answers, it answers what serde would (tested below on
//! arbitrary messages and on their corruptions).
//!
//! The encoder writes the same messages byte for byte as ciborium does (tested below), without
//! serde's calls per field: encoding a lookup was a seventh of a client's CPU per query.

use crate::record::RecordKey;
use crate::wire::{
    Body, Envelope, FindEvent, FindResult, HopTiming, PackedRow, PeerId, RecordOut, Routing,
    TraceContext,
};
use std::net::{Ipv6Addr, SocketAddr};

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    /// An item's major type and argument; definite lengths only.
    fn head(&mut self) -> Option<(u8, u64)> {
        let first = *self.take(1)?.first()?;
        let (major, info) = (first >> 5, first & 0x1f);
        let arg = match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.take(1)?[0]),
            25 => u64::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?)),
            26 => u64::from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)),
            27 => u64::from_be_bytes(self.take(8)?.try_into().ok()?),
            _ => return None,
        };
        Some((major, arg))
    }

    fn expect(&mut self, major: u8) -> Option<u64> {
        match self.head()? {
            (m, arg) if m == major => Some(arg),
            _ => None,
        }
    }

    fn uint(&mut self) -> Option<u64> {
        self.expect(0)
    }

    fn peer_id(&mut self) -> Option<PeerId> {
        PeerId::try_from(self.uint()?).ok()
    }

    fn string(&mut self, major: u8) -> Option<&'a [u8]> {
        let len = usize::try_from(self.expect(major)?).ok()?;
        self.take(len)
    }

    fn text(&mut self) -> Option<&'a [u8]> {
        self.string(3)
    }

    /// The next map key must be `name`.
    fn key(&mut self, name: &str) -> Option<()> {
        (self.text()? == name.as_bytes()).then_some(())
    }

    fn boolean(&mut self) -> Option<bool> {
        match self.take(1)?[0] {
            0xf4 => Some(false),
            0xf5 => Some(true),
            _ => None,
        }
    }

    /// A map or array header: its length, which must be `len` for a map of known fields.
    fn container(&mut self, major: u8) -> Option<usize> {
        let n = usize::try_from(self.expect(major)?).ok()?;
        // Each element takes a byte at least: no allocation beyond the datagram's size.
        (n <= self.bytes.len() - self.pos).then_some(n)
    }

    fn record_key(&mut self) -> Option<RecordKey> {
        (self.container(5)? == 1).then_some(())?;
        match self.text()? {
            b"Event" => Some(RecordKey::Event(self.uint()?)),
            b"Fallback" => Some(RecordKey::Fallback(self.uint()?)),
            _ => None,
        }
    }

    fn path(&mut self) -> Option<Vec<PeerId>> {
        let n = self.container(4)?;
        let mut path = Vec::with_capacity(n + 1);
        for _ in 0..n {
            path.push(self.peer_id()?);
        }
        Some(path)
    }

    fn hops(&mut self) -> Option<Vec<HopTiming>> {
        let n = self.container(4)?;
        let mut hops = Vec::with_capacity(n + 1);
        for _ in 0..n {
            (self.container(5)? == 2).then_some(())?;
            self.key("peer")?;
            let peer = self.peer_id()?;
            self.key("at_us")?;
            hops.push(HopTiming {
                peer,
                at_us: self.uint()?,
            });
        }
        Some(hops)
    }

    /// A struct's last field when serde skips it if empty: there in a map of `with` fields,
    /// absent in one of `with - 1`; any other count is not the shape.
    fn optional<T>(
        &mut self,
        fields: usize,
        with: usize,
        name: &str,
        read: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<Option<T>> {
        match fields {
            n if n + 1 == with => Some(None),
            n if n == with => {
                self.key(name)?;
                read(self).map(Some)
            }
            _ => None,
        }
    }

    fn owned_text(&mut self) -> Option<String> {
        String::from_utf8(self.text()?.to_vec()).ok()
    }

    fn trace(&mut self) -> Option<TraceContext> {
        let fields = self.container(5)?;
        self.key("traceparent")?;
        let traceparent = self.owned_text()?;
        let tracestate = self.optional(fields, 2, "tracestate", Self::owned_text)?;
        Some(TraceContext {
            traceparent,
            tracestate,
        })
    }

    /// The first two fields of a query's messages, both ways.
    fn query_and_key(&mut self) -> Option<(u64, RecordKey)> {
        self.key("query")?;
        let query = self.uint()?;
        self.key("key")?;
        Some((query, self.record_key()?))
    }

    /// serde's `SocketAddr` where it is not human-readable: `{"V4": [[4 octets], port]}` or
    /// `{"V6": [[16 octets], port]}`.
    fn socket_addr(&mut self) -> Option<SocketAddr> {
        (self.container(5)? == 1).then_some(())?;
        let octets = match self.text()? {
            b"V4" => 4,
            b"V6" => 16,
            _ => return None,
        };
        (self.container(4)? == 2).then_some(())?;
        (self.container(4)? == octets).then_some(())?;
        let mut ip = [0u8; 16];
        for octet in ip.iter_mut().take(octets) {
            *octet = u8::try_from(self.uint()?).ok()?;
        }
        let port = u16::try_from(self.uint()?).ok()?;
        Some(match octets {
            4 => SocketAddr::from(([ip[0], ip[1], ip[2], ip[3]], port)),
            _ => SocketAddr::from((Ipv6Addr::from(ip), port)),
        })
    }

    fn find_event(&mut self) -> Option<FindEvent> {
        // Five fields, or six with `reply_to` (set by the entry peer of a client's lookup).
        let fields = self.container(5)?;
        let (query, key) = self.query_and_key()?;
        self.key("path")?;
        let path = self.path()?;
        self.key("hops")?;
        let hops = self.hops()?;
        self.key("routing")?;
        let routing = match self.text()? {
            b"walk" => Routing::Walk,
            b"fingers" => Routing::Fingers,
            _ => return None,
        };
        let reply_to = self.optional(fields, 6, "reply_to", Self::socket_addr)?;
        Some(FindEvent {
            query,
            key,
            path,
            hops,
            routing,
            reply_to,
        })
    }

    fn packed_row(&mut self) -> Option<PackedRow> {
        PackedRow::from_bytes(self.string(2)?.to_vec()).ok()
    }

    fn find_result(&mut self) -> Option<FindResult> {
        (self.container(5)? == 8).then_some(())?;
        let (query, key) = self.query_and_key()?;
        self.key("found")?;
        let found = self.boolean()?;
        self.key("records")?;
        let n = self.container(4)?;
        let mut records = Vec::with_capacity(n);
        for _ in 0..n {
            (self.container(5)? == 2).then_some(())?;
            self.key("columns")?;
            let columns = self.packed_row()?;
            self.key("values")?;
            let values = self.packed_row()?;
            records.push(RecordOut { columns, values });
        }
        self.key("path")?;
        let path = self.path()?;
        self.key("truncated")?;
        let truncated = self.boolean()?;
        self.key("hops")?;
        let hops = self.hops()?;
        self.key("unreached")?;
        let unreached = self.boolean()?;
        Some(FindResult {
            query,
            key,
            found,
            records,
            path,
            truncated,
            hops,
            unreached,
        })
    }

    /// An array of `item`s (a verify's multi-gets and their answers).
    fn many<T>(&mut self, item: fn(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let n = self.container(4)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(item(self)?);
        }
        Some(out)
    }

    fn body(&mut self) -> Option<Body> {
        (self.container(5)? == 1).then_some(())?;
        match self.text()? {
            b"Lookup" => Some(Body::Lookup(self.find_event()?)),
            b"Find" => Some(Body::Find(self.find_event()?)),
            b"Answer" => Some(Body::Answer(self.find_result()?)),
            b"Found" => Some(Body::Found(self.find_result()?)),
            b"Ack" => {
                let fields = self.container(5)?;
                self.key("seq")?;
                let seq = self.uint()?;
                let new_rows =
                    self.optional(fields, 2, "new_rows", |r| u32::try_from(r.uint()?).ok())?;
                Some(Body::Ack { seq, new_rows })
            }
            b"Lookups" => Some(Body::Lookups(self.many(Self::find_event)?)),
            b"Answers" => Some(Body::Answers(self.many(Self::find_result)?)),
            _ => None,
        }
    }

    fn envelope(&mut self) -> Option<Envelope> {
        let fields = self.container(5)?;
        self.key("v")?;
        let v = u16::try_from(self.uint()?).ok()?;
        self.key("from")?;
        let from = self.uint()?;
        self.key("seq")?;
        let seq = self.uint()?;
        let trace = self.optional(fields, 5, "trace", Self::trace)?;
        self.key("body")?;
        let body = self.body()?;
        Some(Envelope {
            v,
            from,
            seq,
            trace,
            body,
        })
    }
}

/// Writes CBOR items as ciborium does: every head in its shortest form, definite lengths.
struct Writer {
    out: Vec<u8>,
}

impl Writer {
    fn head(&mut self, major: u8, arg: u64) {
        let major = major << 5;
        match arg {
            0..=23 => self.out.push(major | arg as u8),
            24..=0xff => self.out.extend_from_slice(&[major | 24, arg as u8]),
            0x100..=0xffff => {
                self.out.push(major | 25);
                self.out.extend_from_slice(&(arg as u16).to_be_bytes());
            }
            0x1_0000..=0xffff_ffff => {
                self.out.push(major | 26);
                self.out.extend_from_slice(&(arg as u32).to_be_bytes());
            }
            _ => {
                self.out.push(major | 27);
                self.out.extend_from_slice(&arg.to_be_bytes());
            }
        }
    }

    fn uint(&mut self, n: u64) {
        self.head(0, n);
    }

    fn string(&mut self, major: u8, bytes: &[u8]) {
        self.head(major, bytes.len() as u64);
        self.out.extend_from_slice(bytes);
    }

    fn text(&mut self, s: &str) {
        self.string(3, s.as_bytes());
    }

    fn boolean(&mut self, b: bool) {
        self.out.push(if b { 0xf5 } else { 0xf4 });
    }

    fn record_key(&mut self, key: RecordKey) {
        self.head(5, 1);
        match key {
            RecordKey::Event(_) => self.text("Event"),
            RecordKey::Fallback(_) => self.text("Fallback"),
        }
        self.uint(key.as_u64());
    }

    fn path(&mut self, path: &[PeerId]) {
        self.head(4, path.len() as u64);
        for id in path {
            self.uint(u64::from(*id));
        }
    }

    fn hops(&mut self, hops: &[HopTiming]) {
        self.head(4, hops.len() as u64);
        for h in hops {
            self.head(5, 2);
            self.text("peer");
            self.uint(u64::from(h.peer));
            self.text("at_us");
            self.uint(h.at_us);
        }
    }

    fn query_and_key(&mut self, query: u64, key: RecordKey) {
        self.text("query");
        self.uint(query);
        self.text("key");
        self.record_key(key);
    }

    fn socket_addr(&mut self, addr: SocketAddr) {
        self.head(5, 1);
        self.text(if addr.is_ipv4() { "V4" } else { "V6" });
        self.head(4, 2);
        // serde writes a V6 address's octets and port only (not its flow and scope).
        let octets: Vec<u8> = match addr {
            SocketAddr::V4(a) => a.ip().octets().to_vec(),
            SocketAddr::V6(a) => a.ip().octets().to_vec(),
        };
        self.head(4, octets.len() as u64);
        for octet in octets {
            self.uint(u64::from(octet));
        }
        self.uint(u64::from(addr.port()));
    }

    fn find_event(&mut self, f: &FindEvent) -> Option<()> {
        self.head(5, if f.reply_to.is_some() { 6 } else { 5 });
        self.query_and_key(f.query, f.key);
        self.text("path");
        self.path(&f.path);
        self.text("hops");
        self.hops(&f.hops);
        self.text("routing");
        self.text(match f.routing {
            Routing::Walk => "walk",
            Routing::Fingers => "fingers",
        });
        if let Some(addr) = f.reply_to {
            self.text("reply_to");
            self.socket_addr(addr);
        }
        Some(())
    }

    fn find_result(&mut self, r: &FindResult) -> Option<()> {
        let records = r.records.iter();
        self.find_result_with(
            r,
            records.map(|rec| (rec.columns.as_bytes(), rec.values.as_bytes())),
        )
    }

    /// `r` with `records` (packed column names, packed values) in place of its own.
    fn find_result_with<'a>(
        &mut self,
        r: &FindResult,
        records: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Option<()> {
        self.head(5, 8);
        self.query_and_key(r.query, r.key);
        self.text("found");
        self.boolean(r.found);
        self.text("records");
        self.head(4, records.len() as u64);
        for (columns, values) in records {
            self.head(5, 2);
            self.text("columns");
            self.string(2, columns);
            self.text("values");
            self.string(2, values);
        }
        self.text("path");
        self.path(&r.path);
        self.text("truncated");
        self.boolean(r.truncated);
        self.text("hops");
        self.hops(&r.hops);
        self.text("unreached");
        self.boolean(r.unreached);
        Some(())
    }

    fn many<T>(&mut self, items: &[T], item: fn(&mut Self, &T) -> Option<()>) -> Option<()> {
        self.head(4, items.len() as u64);
        items.iter().try_for_each(|i| item(self, i))
    }

    fn body(&mut self, body: &Body) -> Option<()> {
        self.head(5, 1);
        match body {
            Body::Lookup(f) => {
                self.text("Lookup");
                self.find_event(f)
            }
            Body::Find(f) => {
                self.text("Find");
                self.find_event(f)
            }
            Body::Answer(r) => {
                self.text("Answer");
                self.find_result(r)
            }
            Body::Found(r) => {
                self.text("Found");
                self.find_result(r)
            }
            Body::Ack { seq, new_rows } => {
                self.text("Ack");
                self.head(5, if new_rows.is_some() { 2 } else { 1 });
                self.text("seq");
                self.uint(*seq);
                if let Some(n) = new_rows {
                    self.text("new_rows");
                    self.uint(u64::from(*n));
                }
                Some(())
            }
            Body::Lookups(finds) => {
                self.text("Lookups");
                self.many(finds, Self::find_event)
            }
            Body::Answers(results) => {
                self.text("Answers");
                self.many(results, Self::find_result)
            }
            _ => None,
        }
    }

    fn envelope(&mut self, env: &Envelope) -> Option<()> {
        self.header(env.v, env.from, env.seq, env.trace.as_ref());
        self.body(&env.body)
    }

    /// An envelope's fields up to its body's key.
    fn header(&mut self, v: u16, from: u64, seq: u64, trace: Option<&TraceContext>) {
        self.head(5, if trace.is_some() { 5 } else { 4 });
        self.text("v");
        self.uint(u64::from(v));
        self.text("from");
        self.uint(from);
        self.text("seq");
        self.uint(seq);
        if let Some(trace) = trace {
            self.text("trace");
            self.head(5, if trace.tracestate.is_some() { 2 } else { 1 });
            self.text("traceparent");
            self.text(&trace.traceparent);
            if let Some(state) = &trace.tracestate {
                self.text("tracestate");
                self.text(state);
            }
        }
        self.text("body");
    }
}

/// Encodes `env` into `out` (cleared first) as ciborium would, if it is one of a query's
/// messages; false, with `out` to be discarded, for anything else (serde encodes it).
pub fn encode_into(env: &Envelope, out: &mut Vec<u8>) -> bool {
    out.clear();
    let mut writer = Writer {
        out: std::mem::take(out),
    };
    let done = writer.envelope(env).is_some();
    *out = writer.out;
    done
}

/// Encodes into `out` (cleared first) the envelope of protocol version `v` from `from`,
/// numbered `seq`, whose body is `Find(find)`, byte for byte as [`encode_into`] encodes that
/// envelope, but from a borrowed `find`: a hop's sender keeps its `FindEvent` (to route
/// around a next peer that does not answer) and need not copy it to send it. False, with
/// `out` to be discarded, if it could not (the caller then encodes the envelope).
pub fn encode_find_into(
    (v, from, seq): (u16, u64, u64),
    trace: Option<&TraceContext>,
    find: &FindEvent,
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    let mut writer = Writer {
        out: std::mem::take(out),
    };
    writer.header(v, from, seq, trace);
    writer.head(5, 1);
    writer.text("Find");
    let done = writer.find_event(find).is_some();
    *out = writer.out;
    done
}

/// Encodes into `out` (cleared first) the unsequenced envelope from `from` whose body is
/// `Answer(result)` with `records` (packed column names, packed values) as its records, byte
/// for byte as [`encode_into`] encodes that envelope with the records owned: the peer that
/// answers writes its rows straight from its store. False, with `out` to be discarded, if it
/// could not.
pub fn encode_answer_into(
    (v, from): (u16, u64),
    result: &FindResult,
    records: &[(&[u8], &[u8])],
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    let mut writer = Writer {
        out: std::mem::take(out),
    };
    writer.header(v, from, crate::wire::UNSEQUENCED, None);
    writer.head(5, 1);
    writer.text("Answer");
    let done = writer
        .find_result_with(result, records.iter().copied())
        .is_some();
    *out = writer.out;
    done
}

/// The envelope in `bytes` if it is one of a query's messages in ciborium's exact shape, with
/// nothing after it; `None` for anything else (the general decoder decides).
pub fn envelope(bytes: &[u8]) -> Option<Envelope> {
    let mut reader = Reader { bytes, pos: 0 };
    let env = reader.envelope()?;
    (reader.pos == bytes.len()).then_some(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn general(bytes: &[u8]) -> Option<Envelope> {
        let mut reader = bytes;
        ciborium::de::from_reader::<Envelope, _>(&mut reader)
            .ok()
            .filter(|_| reader.is_empty())
    }

    fn encode(env: &Envelope) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::ser::into_writer(env, &mut out).unwrap();
        out
    }

    fn key() -> impl Strategy<Value = RecordKey> {
        prop_oneof![
            any::<u64>().prop_map(RecordKey::Event),
            any::<u64>().prop_map(RecordKey::Fallback),
        ]
    }

    fn hops() -> impl Strategy<Value = Vec<HopTiming>> {
        prop::collection::vec(
            (any::<u32>(), any::<u64>()).prop_map(|(peer, at_us)| HopTiming { peer, at_us }),
            0..4,
        )
    }

    fn find_event() -> impl Strategy<Value = FindEvent> {
        (
            any::<u64>(),
            key(),
            prop::collection::vec(any::<u32>(), 0..5),
            hops(),
            any::<bool>(),
            prop::option::weighted(
                0.3,
                prop_oneof![
                    (any::<[u8; 4]>(), any::<u16>()).prop_map(SocketAddr::from),
                    (any::<[u8; 16]>(), any::<u16>())
                        .prop_map(|(ip, port)| SocketAddr::from((Ipv6Addr::from(ip), port))),
                ],
            ),
        )
            .prop_map(|(query, key, path, hops, fingers, reply_to)| FindEvent {
                query,
                key,
                path,
                hops,
                routing: if fingers {
                    Routing::Fingers
                } else {
                    Routing::Walk
                },
                reply_to,
            })
    }

    fn find_result() -> impl Strategy<Value = FindResult> {
        let row = prop::collection::vec("[a-zA-Z0-9 ,é\"]{0,12}", 0..6)
            .prop_map(|fields| PackedRow::pack(&fields));
        (
            (any::<u64>(), key(), any::<bool>()),
            prop::collection::vec((row.clone(), row), 0..3),
            prop::collection::vec(any::<u32>(), 0..5),
            (any::<bool>(), hops(), any::<bool>()),
        )
            .prop_map(
                |((query, key, found), rows, path, (truncated, hops, unreached))| FindResult {
                    query,
                    key,
                    found,
                    records: rows
                        .into_iter()
                        .map(|(columns, values)| RecordOut { columns, values })
                        .collect(),
                    path,
                    truncated,
                    hops,
                    unreached,
                },
            )
    }

    fn envelope_strategy() -> impl Strategy<Value = Envelope> {
        let body = prop_oneof![
            find_event().prop_map(Body::Lookup),
            find_event().prop_map(Body::Find),
            find_result().prop_map(Body::Answer),
            find_result().prop_map(Body::Found),
            prop::collection::vec(find_event(), 0..3).prop_map(Body::Lookups),
            prop::collection::vec(find_result(), 0..3).prop_map(Body::Answers),
            (any::<u64>(), prop::option::of(any::<u32>()))
                .prop_map(|(seq, new_rows)| Body::Ack { seq, new_rows }),
            prop::collection::vec(any::<u64>(), 0..4).prop_map(|seqs| Body::Acks { seqs }),
            Just(Body::LeaveRequest),
            any::<u64>().prop_map(|probe| Body::Probe { probe }),
        ];
        let trace = prop::option::of(
            ("[0-9a-f-]{0,55}", prop::option::of("[a-z=,]{0,10}")).prop_map(
                |(traceparent, tracestate)| TraceContext {
                    traceparent,
                    tracestate,
                },
            ),
        );
        (any::<u16>(), any::<u64>(), any::<u64>(), trace, body).prop_map(
            |(v, from, seq, trace, body)| Envelope {
                v,
                from,
                seq,
                trace,
                body,
            },
        )
    }

    /// The messages the quick codec takes.
    fn on_the_quick_path(body: &Body) -> bool {
        matches!(
            body,
            Body::Lookup(_)
                | Body::Find(_)
                | Body::Lookups(_)
                | Body::Answer(_)
                | Body::Found(_)
                | Body::Answers(_)
                | Body::Ack { .. }
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// A query's message is written byte for byte as ciborium writes it; anything else
        /// is left to serde.
        #[test]
        fn writes_a_querys_messages_as_ciborium_does(env in envelope_strategy()) {
            let mut out = vec![0xff; 3];
            let done = encode_into(&env, &mut out);
            let ours = on_the_quick_path(&env.body);
            prop_assert_eq!(done, ours);
            if done {
                prop_assert_eq!(out, encode(&env));
            }
        }

        /// A hop written from a borrowed `FindEvent` is the envelope of that hop, byte for
        /// byte (the envelope's `v`, sender, number and trace, any `FindEvent`).
        #[test]
        fn a_hop_written_from_its_find_is_its_envelope(env in envelope_strategy(), find in find_event()) {
            let hop = Envelope { body: Body::Find(find.clone()), ..env };
            let mut out = vec![0xff; 3];
            prop_assert!(encode_find_into((hop.v, hop.from, hop.seq), hop.trace.as_ref(), &find, &mut out));
            prop_assert_eq!(&out, &encode(&hop));
            // And as the link sends it (at this version).
            let sent = Envelope::encode_find(hop.from, hop.seq, hop.trace.as_ref(), &find, crate::wire::MAX_MESSAGE);
            let hop = Envelope { v: crate::wire::PROTOCOL_VERSION, ..hop };
            prop_assert_eq!(sent.ok(), Some(encode(&hop)));
        }

        /// An answer written with its rows borrowed (as a peer writes them from its store) is
        /// the envelope of that answer with the rows owned, byte for byte; and as the link
        /// sends it.
        #[test]
        fn an_answer_written_from_borrowed_rows_is_its_envelope(from in any::<u64>(), result in find_result()) {
            let rows: Vec<(&[u8], &[u8])> = result
                .records
                .iter()
                .map(|r| (r.columns.as_bytes(), r.values.as_bytes()))
                .collect();
            let bare = FindResult { records: Vec::new(), ..result.clone() };
            let answer = Envelope::new(from, crate::wire::UNSEQUENCED, None, Body::Answer(result.clone()));
            let mut out = vec![0xff; 3];
            prop_assert!(encode_answer_into((answer.v, from), &bare, &rows, &mut out));
            prop_assert_eq!(&out, &encode(&answer));
            prop_assert_eq!(Envelope::encode_answer(from, &bare, &rows).ok(), Some(encode(&answer)));
        }

        /// A query's message as ciborium writes it is read back whole; anything else is left
        /// to the general decoder.
        #[test]
        fn reads_back_a_querys_messages_and_leaves_the_rest(env in envelope_strategy()) {
            let bytes = encode(&env);
            let quick = envelope(&bytes);
            let on_path = on_the_quick_path(&env.body);
            if on_path {
                prop_assert_eq!(quick, Some(env));
            } else {
                prop_assert_eq!(quick, None);
            }
        }

        /// Corrupted, cut short or lengthened: where the quick reader still answers, it
        /// answers what the general decoder does.
        #[test]
        fn where_it_answers_it_agrees_with_the_general_decoder(
            env in envelope_strategy(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<prop::sample::Index>(),
            extra in prop::collection::vec(any::<u8>(), 0..3),
        ) {
            let mut bytes = encode(&env);
            let i = at.index(bytes.len());
            bytes[i] = byte;
            if let Some(quick) = envelope(&bytes) {
                prop_assert_eq!(Some(quick), general(&bytes));
            }
            bytes.truncate(cut.index(bytes.len() + 1));
            bytes.extend(extra);
            if let Some(quick) = envelope(&bytes) {
                prop_assert_eq!(Some(quick), general(&bytes));
            }
        }
    }

    #[test]
    fn a_traced_lookup_and_an_answer_with_rows_are_read_without_the_general_decoder() {
        let lookup = Envelope::new(
            7,
            0,
            Some(TraceContext {
                traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
                tracestate: None,
            }),
            Body::Lookup(FindEvent {
                query: 3,
                key: RecordKey::Event(5_570_068),
                path: vec![],
                hops: vec![],
                routing: Routing::Fingers,
                reply_to: None,
            }),
        );
        assert_eq!(envelope(&encode(&lookup)), Some(lookup));
        let answer = Envelope::new(
            9,
            0,
            None,
            Body::Answer(FindResult {
                query: 3,
                key: RecordKey::Event(5_570_068),
                found: true,
                records: vec![RecordOut::new(
                    &["EVENT_ID", "STATE"],
                    PackedRow::pack(&["5570068", "OHIO"]),
                )],
                path: vec![2],
                truncated: false,
                hops: vec![HopTiming {
                    peer: 2,
                    at_us: 1_765_000_000_000_000,
                }],
                unreached: false,
            }),
        );
        assert_eq!(envelope(&encode(&answer)), Some(answer));
        // A row that is not a packed row: left to the general decoder, which refuses it.
        let mut bytes = encode(&Envelope::new(
            9,
            0,
            None,
            Body::Answer(FindResult {
                query: 3,
                key: RecordKey::Event(1),
                found: true,
                records: vec![RecordOut::new(&["A"], PackedRow::pack(&["x"]))],
                path: vec![],
                truncated: false,
                hops: vec![],
                unreached: false,
            }),
        ));
        let at = bytes.windows(2).position(|w| w == [1, b'x']).unwrap();
        bytes[at] = 9; // the field's length now runs past the row
        assert_eq!(envelope(&bytes), None);
        assert!(Envelope::decode(&bytes).is_err());
    }
}
