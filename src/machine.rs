//! The shape of every protocol state machine (manager, peer): sans-IO, as in quinn-proto.
//! Time and inputs come in as arguments; the events an input produced come back from that
//! very call; datagrams to send are pulled. The driver runs anything of this shape.

use crate::link::{Dropped, Time, Transmit};
use crate::wire::{Envelope, TraceContext};
use std::net::SocketAddr;

/// Datagrams, timeouts and local inputs in; events returned, datagrams pulled.
pub trait Machine {
    type Event;
    /// Inputs that come from the driver's side rather than the network (a file it loaded).
    type Local;
    fn handle(
        &mut self,
        now: Time,
        from: SocketAddr,
        env: Envelope,
        trace: Option<TraceContext>,
    ) -> Vec<Self::Event>;
    /// Puts a message that comes in fragments together before it is handled, so that the
    /// driver opens the span of the whole message (a ring view of many members), not of a
    /// fragment, and the span takes the message's trace context (a fragment has none). None:
    /// a fragment kept (or dropped) for now. [`Machine::handle`] still takes fragments too.
    /// By default every envelope is handled as it came.
    fn reassemble(&mut self, _now: Time, _from: SocketAddr, env: Envelope) -> Option<Envelope> {
        Some(env)
    }
    /// Takes back a list of events the machine returned, emptied by the driver, so that the
    /// next one reuses its room: otherwise every datagram that makes an event (each query
    /// hop) allocates a list. By default it is dropped; [`reuse_events`] does it for a machine
    /// that gathers its events in a list.
    fn recycle_events(&mut self, _spent: Vec<Self::Event>) {}
    fn handle_timeout(&mut self, now: Time) -> Vec<Self::Event>;
    fn handle_local(&mut self, now: Time, input: Self::Local) -> Vec<Self::Event>;
    fn poll_timeout(&self) -> Option<Time>;
    fn poll_transmit(&mut self) -> Option<Transmit>;
    /// The driver dropped datagrams that did not decode or were not authentic (`status`).
    fn note_dropped(&mut self, dropped: Dropped);
    fn incarnation(&self) -> u64;
    /// The wall clock (µs since the Unix epoch) at the machine's time zero, told by the
    /// driver when it starts its clock; only stamps for people (hop timelines) use it.
    fn set_clock_origin(&mut self, _unix_us: u64) {}
}

/// [`Machine::recycle_events`] for a machine that gathers its events in `events`: it takes
/// `spent`'s room, unless it has room of its own (events pushed since it handed its list out,
/// which must not be lost).
pub fn reuse_events<E>(events: &mut Vec<E>, mut spent: Vec<E>) {
    if events.capacity() == 0 {
        spent.clear();
        *events = spent;
    }
}
