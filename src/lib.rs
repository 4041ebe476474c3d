//! stormdht: a distributed hash table of NOAA storm events over UDP, in CBOR datagrams, with
//! one OpenTelemetry trace per query.
//!
//! The crate is layered so that the protocol can be tested without sockets or clocks:
//!
//! | layer | modules | owns |
//! | --- | --- | --- |
//! | records | [`record`] | NOAA CSV (details, locations, course; plain or gzip) → keyed rows |
//! | wire | [`wire`], [`cbor_guard`] | the versioned CBOR [`wire::Envelope`], every message kind, typed rejections and errors; length checks before decoding |
//! | reliability | [`link`] | sequence numbers, acks, retransmission with backoff, duplicate suppression |
//! | placement | [`ring`] | consistent hashing (and the seed's and course's schemes), ring order |
//! | state | [`store`] | a peer's rows and the batching that moves them |
//! | protocol | [`manager`] (registry, membership, distribute, query, status, teardown), [`peer`], [`client::ClientCore`] | sans-IO state machines: (time, datagram) in; the events of that one input returned, datagrams pulled |
//! | driver | [`driver`] | the one loop that runs a machine over a [`driver::socket::DatagramSocket`]: real UDP in production, the in-memory network in the simulation; spans and side effects in a per-role shell |
//! | cluster, client | [`cluster`], [`client`], [`report`] | a loopback cluster in one process (demo, bench); `stormctl`'s requests, `verify`, output |
//! | config, telemetry | [`config`], [`telemetry`] | figment layers; logs and OTLP spans |
//!
//! Imports only run down this table: no machine imports tokio, a socket or a clock. The tests
//! add a simulation (`sim`, test builds only): the production drivers over a simulated
//! network in virtual time, seeded and replayable.
//!
//! The binaries are thin: `stormd` (manager, peer, or `demo`) and `stormctl`.

#[cfg(test)]
mod alloc_count;
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: alloc_count::Counting = alloc_count::Counting;

pub mod auth;
pub mod cbor_guard;
pub mod client;
pub mod cluster;
pub mod config;
pub mod driver;
pub mod link;
pub mod machine;
pub mod manager;
pub mod measure;
pub mod peer;
mod quick_codec;
pub mod record;
pub mod report;
pub mod ring;
pub mod ring_delta;
#[cfg(test)]
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod wire;
