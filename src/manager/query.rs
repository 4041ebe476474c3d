//! Queries: the manager sends `find_event` into the ring at an entry peer, enters elsewhere
//! when that peer refuses or is silent, or when no answer came for a while (a walk can die
//! with a peer that took it and then exited), and relays the first answer to the client.

use super::{ClientCall, Manager, ManagerEvent, ManagerTag};
use crate::link::Time;
use crate::record::RecordKey;
use crate::ring::RingExt;
use crate::wire::{
    Body, FindEvent, FindResult, Member, PeerId, QueryOutcome, ReplyBody, RequestError, RingView,
    Routing,
};
use std::net::SocketAddr;

pub(super) struct PendingQuery {
    pub(super) call: ClientCall,
    key: RecordKey,
    routing: Routing,
    sent: Time,
    pub(super) deadline: Time,
    /// When the query enters the ring again if no answer came by then.
    pub(super) reenter_at: Time,
    /// The entry peer of the last attempt.
    entry: PeerId,
    /// Entry peers that refused the query or did not acknowledge it.
    tried: Vec<PeerId>,
}

/// Queries the manager follows at once; beyond it clients are told to retry, so a flood of
/// requests cannot grow its memory without bound.
const MAX_QUERIES_IN_FLIGHT: usize = 16_384;

/// Where a query enters the ring: round the ring from member `start`, the first member not
/// `avoid`ed, a staying one before a leaving one (a leaving member may exit with the walk still
/// in its hands).
fn entry_from(ring: &RingView, start: usize, avoid: impl Fn(&Member) -> bool) -> Option<&Member> {
    let n = ring.members.len();
    let round = || {
        (0..n)
            .map(|k| &ring.members[(start + k) % n])
            .filter(|m| !avoid(m))
    };
    round().find(|m| !m.leaving).or_else(|| round().next())
}

impl Manager {
    pub(super) fn query(
        &mut self,
        now: Time,
        call: ClientCall,
        key: RecordKey,
        via: Option<String>,
        routing: Option<Routing>,
    ) {
        let Some(ring) = self.ring.as_ref() else {
            return self.reply(now, &call, Err(RequestError::NoRing));
        };
        if self.queries.len() >= MAX_QUERIES_IN_FLIGHT {
            let busy = RequestError::Busy {
                in_flight: MAX_QUERIES_IN_FLIGHT,
            };
            return self.reply(now, &call, Err(busy));
        }
        let entry = match via {
            Some(v) => match ring
                .members
                .iter()
                .find(|m| m.name == v || m.id.to_string() == v)
            {
                Some(m) => m.clone(),
                None => return self.reply(now, &call, Err(RequestError::NotInRing { name: v })),
            },
            None => {
                self.next_entry = self.next_entry.wrapping_add(1);
                match entry_from(ring, self.next_entry, |_| false) {
                    Some(m) => m.clone(),
                    None => return self.reply(now, &call, Err(RequestError::NoRing)),
                }
            }
        };
        let query = self.next_query;
        self.next_query += 1;
        let deadline = now + self.cfg.query_timeout;
        self.queries.insert(
            query,
            PendingQuery {
                call,
                key,
                routing: routing.unwrap_or(self.cfg.routing),
                sent: now,
                deadline,
                reenter_at: now + self.reenter_after(),
                entry: entry.id,
                tried: Vec::new(),
            },
        );
        self.send_find(now, query, entry.id, entry.addr);
    }

    pub(super) fn send_find(
        &mut self,
        now: Time,
        query: u64,
        entry: PeerId,
        entry_addr: SocketAddr,
    ) {
        let reenter_at = now + self.reenter_after();
        let Some(q) = self.queries.get_mut(&query) else {
            return;
        };
        q.entry = entry;
        q.reenter_at = reenter_at;
        let (key, routing, trace) = (q.key, q.routing, q.call.trace.clone());
        self.events.push(ManagerEvent::QueryDispatched {
            query,
            key,
            entry,
            entry_addr,
        });
        let find = FindEvent {
            query,
            key,
            path: Vec::new(),
            hops: Vec::new(),
            routing,
            reply_to: None,
        };
        let tag = ManagerTag::Find { query, entry };
        self.send(now, entry_addr, Body::Find(find), trace, tag);
    }

    /// The entry peer refused the query (not in the ring yet) or did not acknowledge it: enter
    /// the ring somewhere else, until every member has been tried.
    pub(super) fn retry_find(&mut self, now: Time, query: u64, failed: PeerId, why: String) {
        let Some(q) = self.queries.get_mut(&query) else {
            return;
        };
        q.tried.push(failed);
        let tried = q.tried.clone();
        let next = self
            .ring
            .as_ref()
            .and_then(|r| entry_from(r, 0, |m| tried.contains(&m.id)))
            .map(|m| (m.id, m.addr));
        match next {
            Some((id, addr)) => self.send_find(now, query, id, addr),
            None => self.fail_query(now, query, |key| RequestError::NoEntry { key, last: why }),
        }
    }

    /// How long a query waits for an answer before it enters the ring again: a quarter of its
    /// time, so that a walk lost past its entry peer costs a retry, not the query.
    fn reenter_after(&self) -> std::time::Duration {
        (self.cfg.query_timeout / 4).max(std::time::Duration::from_millis(250))
    }

    /// Enters the ring again for each query whose answer is overdue, at a staying member other
    /// than the last entry (a read: a second walk costs datagrams, never a wrong answer; the
    /// first answer wins).
    pub(super) fn reenter_overdue(&mut self, now: Time) {
        let overdue: Vec<(u64, PeerId)> = self
            .queries
            .iter()
            .filter(|(_, q)| q.reenter_at <= now && q.deadline > now)
            .map(|(id, q)| (*id, q.entry))
            .collect();
        for (query, last) in overdue {
            let next = self.ring.as_ref().and_then(|r| {
                let after_last = r
                    .members
                    .iter()
                    .position(|m| m.id == last)
                    .map_or(0, |i| i + 1);
                entry_from(r, after_last, |m| m.id == last).map(|m| (m.id, m.addr))
            });
            match next {
                Some((id, addr)) => self.send_find(now, query, id, addr),
                // A ring of one: wait for its answer (or the deadline).
                None => {
                    let at = now + self.reenter_after();
                    if let Some(q) = self.queries.get_mut(&query) {
                        q.reenter_at = at;
                    }
                }
            }
        }
    }

    pub(super) fn fail_query(
        &mut self,
        now: Time,
        query: u64,
        error: impl FnOnce(RecordKey) -> RequestError,
    ) {
        if let Some(q) = self.queries.remove(&query) {
            let err = error(q.key);
            self.events.push(ManagerEvent::QueryFailed {
                query,
                reason: err.to_string(),
            });
            self.reply(now, &q.call, Err(err));
        }
    }

    pub(super) fn on_found(&mut self, now: Time, result: FindResult) {
        // An answer about another key is no answer to this query.
        if self
            .queries
            .get(&result.query)
            .is_none_or(|q| q.key != result.key)
        {
            return;
        }
        // A walk that could not ask every holder is no miss: enter the ring elsewhere (until
        // every member was tried, or the query's time is up).
        if result.unreached && !result.found {
            let entry = result.path.first().copied().unwrap_or_default();
            let why = "the walk could not reach every holder of the key".to_string();
            return self.retry_find(now, result.query, entry, why);
        }
        let Some(q) = self.queries.remove(&result.query) else {
            return;
        };
        self.events.push(ManagerEvent::QueryDone {
            query: result.query,
            found: result.found,
            path: result.path.clone(),
        });
        // The walk on this manager's clock: hop stamps come from the peers' wall clocks.
        let outcome = QueryOutcome::from_result(
            result,
            self.cfg.clock_origin_us + q.sent.as_micros() as u64,
            now.saturating_sub(q.sent).as_micros() as u64,
            |id| self.registry.name_of(id),
            |id| {
                self.ring
                    .as_ref()
                    .and_then(|r| r.member(id))
                    .map(|m| m.addr)
            },
        );
        self.reply(now, &q.call, Ok(ReplyBody::Query(outcome)));
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::Kit;
    use crate::record::RecordKey;
    use crate::wire::{ClientRequest, Placement, ReplyBody, RequestError};
    use std::time::Duration;

    fn query(key: u64, via: Option<&str>) -> ClientRequest {
        ClientRequest::Query {
            key: RecordKey::Event(key),
            via: via.map(String::from),
            routing: None,
        }
    }

    #[test]
    fn queries_need_a_ring_and_a_known_entry_peer() {
        let mut kit = Kit::new(Placement::Consistent);
        let seq = kit.request(query(1, None));
        assert_eq!(kit.reply(seq), Err(RequestError::NoRing));
        let mut kit = Kit::with_ring(2);
        let seq = kit.request(query(1, Some("ghost")));
        assert_eq!(
            kit.reply(seq),
            Err(RequestError::NotInRing {
                name: "ghost".into()
            })
        );
    }

    #[test]
    fn the_answer_carries_the_path_with_names() {
        let mut kit = Kit::with_ring(3);
        let seq = kit.request(query(42, Some("p1")));
        match kit.reply(seq) {
            Ok(ReplyBody::Query(q)) => {
                assert!(!q.found);
                assert_eq!(q.path_names, vec!["p1".to_string()]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_result_about_another_key_answers_nothing() {
        let mut kit = Kit::with_ring(3);
        kit.wrong_key.insert("p0".into());
        let seq = kit.request(query(42, Some("p0")));
        assert!(
            !kit.replies.contains_key(&seq),
            "answered with another key's result: {:?}",
            kit.replies
        );
        kit.wrong_key.clear();
        let seq = kit.request(query(42, Some("p0")));
        assert!(matches!(kit.reply(seq), Ok(ReplyBody::Query(q)) if q.key == RecordKey::Event(42)));
    }

    /// The entry peer takes the query and its walk is lost (it exited, or the hop after it
    /// was lost for good): the query enters the ring again elsewhere after a quarter of its
    /// time, instead of waiting out its deadline.
    #[test]
    fn a_query_whose_walk_is_lost_enters_the_ring_again() {
        let mut kit = Kit::with_ring(3);
        kit.mute.insert("p0".into());
        let seq = kit.request(query(42, Some("p0")));
        kit.wait(Duration::from_millis(100));
        assert!(!kit.replies.contains_key(&seq), "answered by a mute entry");
        kit.wait(kit.m.cfg.query_timeout / 4);
        match kit.reply(seq) {
            Ok(ReplyBody::Query(q)) => {
                assert_ne!(q.path_names.first().map(String::as_str), Some("p0"))
            }
            other => panic!("{other:?}"),
        }
    }

    /// A leaving member is no entry: it may exit before its walk is acknowledged.
    #[test]
    fn queries_do_not_enter_at_a_leaving_member() {
        let mut kit = Kit::with_ring(3);
        let p1_index = kit.peers.iter().position(|p| p.name == "p1").expect("p1");
        kit.send_from_peer(p1_index, 900, crate::wire::Body::LeaveRequest);
        // Silent, p1 never finishes its hand-off: it stays a leaving member.
        kit.silent.insert("p1".into());
        kit.run();
        let leaving = kit
            .m
            .ring()
            .and_then(|r| r.members.iter().find(|m| m.name == "p1"))
            .is_some_and(|m| m.leaving);
        assert!(leaving, "p1 is not leaving");
        let p1 = kit.peer("p1").inbox.len();
        for key in 0..12 {
            kit.request(query(key, None));
        }
        kit.run();
        let finds = kit.peer("p1").inbox[p1..]
            .iter()
            .filter(|b| matches!(b, crate::wire::Body::Find(_)))
            .count();
        assert_eq!(finds, 0);
    }

    #[test]
    fn a_silent_entry_peer_is_replaced_and_a_silent_ring_times_out() {
        let mut kit = Kit::with_ring(3);
        kit.silent.insert("p0".into());
        let seq = kit.request(query(42, Some("p0")));
        kit.wait(Duration::from_secs(1));
        match kit.reply(seq) {
            Ok(ReplyBody::Query(q)) => {
                assert_ne!(q.path_names.first().map(String::as_str), Some("p0"))
            }
            other => panic!("{other:?}"),
        }
        for p in ["p1", "p2"] {
            kit.silent.insert(p.into());
        }
        let seq = kit.request(query(42, None));
        kit.wait(Duration::from_secs(5));
        assert!(matches!(
            kit.reply(seq),
            Err(RequestError::NoEntry { .. } | RequestError::QueryTimeout { .. })
        ));
    }
}
