//! Queries: the manager sends `find_event` into the ring at an entry peer, enters elsewhere
//! when that peer refuses or is silent, and relays the owner's answer to the client.

use super::{ClientCall, Manager, ManagerEvent, ManagerTag};
use crate::link::Time;
use crate::record::RecordKey;
use crate::ring::RingExt;
use crate::wire::{
    Body, FindEvent, FindResult, PeerId, QueryOutcome, ReplyBody, RequestError, Routing,
};
use std::net::SocketAddr;

pub(super) struct PendingQuery {
    pub(super) call: ClientCall,
    key: RecordKey,
    routing: Routing,
    sent: Time,
    pub(super) deadline: Time,
    /// Entry peers that refused the query or did not acknowledge it.
    tried: Vec<PeerId>,
}

/// Queries the manager follows at once; beyond it clients are told to retry, so a flood of
/// requests cannot grow its memory without bound.
const MAX_QUERIES_IN_FLIGHT: usize = 16_384;

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
                ring.members[self.next_entry % ring.members.len()].clone()
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
        let Some(q) = self.queries.get(&query) else {
            return;
        };
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
            .and_then(|r| r.members.iter().find(|m| !tried.contains(&m.id)))
            .map(|m| (m.id, m.addr));
        match next {
            Some((id, addr)) => self.send_find(now, query, id, addr),
            None => self.fail_query(now, query, |key| RequestError::NoEntry { key, last: why }),
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
