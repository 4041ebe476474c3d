//! stormdht: a distributed hash table of NOAA storm events over UDP, in CBOR datagrams, with
//! one OpenTelemetry trace per query.
//!
//! The crate is layered so that the protocol can be tested without sockets or clocks:
//!
//! | layer | modules | owns |
//! | --- | --- | --- |
//! | records | [`record`] | NOAA CSV (details, locations, course; plain or gzip) → keyed rows |
//! | wire | [`wire`], [`cbor_guard`] | the versioned CBOR [`wire::Envelope`] and every message kind; length checks before decoding |
//! | reliability | [`link`] | sequence numbers, acks, retransmission with backoff, duplicate suppression |
//! | placement | [`ring`] | consistent hashing (and the seed's and course's schemes), ring order |
//! | state | [`store`] | a peer's rows and the batching that moves them |
//! | protocol | [`manager`], [`peer`] | the sans-IO state machines: (time, datagram) in, datagrams, timers and events out |
//! | simulation | [`sim`] | a whole cluster in memory with seeded loss, duplication and reordering |
//! | drivers | [`node`], [`cluster`] | tokio tasks owning the socket, the clock and the files |
//! | client | [`client`], [`report`] | `stormctl`'s reliable requests, `verify`, and output |
//! | config, telemetry | [`config`], [`telemetry`] | figment layers; logs and OTLP spans |
//!
//! The binaries are thin: `stormd` (manager, peer, or `demo`) and `stormctl`.

pub mod cbor_guard;
pub mod client;
pub mod cluster;
pub mod config;
pub mod driver;
pub mod link;
pub mod manager;
pub mod peer;
pub mod record;
pub mod report;
pub mod ring;
#[cfg(test)]
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod wire;
