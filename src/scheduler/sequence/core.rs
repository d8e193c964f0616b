//! The sequence batcher's bookkeeping, without threads: which sequences exist, which slot each
//! holds, the backlog of sequences waiting for a slot, the requests waiting per sequence, and the
//! choice of the next batch for an instance. Everything here runs under one lock.
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::settings::{SequenceSettings, Strategy};
use super::CorrelationId;

/// Where a sequence runs: Direct binds it to one batch row (`index`) of one instance; Oldest only
/// counts it against `max_candidate_sequences` (instance None: any instance may run it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Slot {
    pub index: usize,
    pub instance: Option<usize>,
}

#[derive(Debug)]
pub struct Sequence<P> {
    pub slot: Option<Slot>,
    pub pending: VecDeque<(P, Instant)>,
    /// One of its requests is executing: the next waits, so state and order are kept.
    pub running: bool,
    pub last_seen: Instant,
}

/// What the worker of one instance should do next.
#[derive(Debug)]
pub enum Next<P> {
    /// Rows to run: (slot index, correlation id, request), in row order.
    Run(Vec<(usize, CorrelationId, P, Instant)>),
    /// Nothing to run now; look again by this time (None: when woken).
    Wait(Option<Instant>),
}

#[derive(Debug)]
pub struct Core<P> {
    pub sequences: HashMap<CorrelationId, Sequence<P>>,
    backlog: VecDeque<CorrelationId>,
    free: BTreeSet<Slot>,
    pub queued: usize,
    pub stopping: bool,
}

impl<P> Core<P> {
    pub fn new(settings: &SequenceSettings, instances: usize) -> Self {
        let free = match settings.strategy {
            Strategy::Direct => (0..settings.slots_per_instance)
                .flat_map(|index| {
                    (0..instances.max(1)).map(move |i| Slot {
                        index,
                        instance: Some(i),
                    })
                })
                .collect(),
            Strategy::Oldest { .. } => (0..settings.max_candidates)
                .map(|index| Slot {
                    index,
                    instance: None,
                })
                .collect(),
        };
        Core {
            sequences: HashMap::new(),
            backlog: VecDeque::new(),
            free,
            queued: 0,
            stopping: false,
        }
    }

    /// Queues a request of sequence `id`; a new sequence takes a free slot or joins the backlog.
    /// The caller has checked START (a request of an unknown sequence must start one).
    pub fn enqueue(&mut self, id: CorrelationId, request: P, now: Instant) {
        let known = self.sequences.contains_key(&id);
        if !known {
            let slot = self.free.pop_first();
            if slot.is_none() {
                self.backlog.push_back(id.clone());
            }
            self.sequences.insert(
                id.clone(),
                Sequence {
                    slot,
                    pending: VecDeque::new(),
                    running: false,
                    last_seen: now,
                },
            );
        }
        if let Some(seq) = self.sequences.get_mut(&id) {
            seq.pending.push_back((request, now));
            seq.last_seen = now;
            self.queued += 1;
        }
    }

    /// A row finished. An ending sequence gives its slot to the first sequence of the backlog.
    pub fn finish(&mut self, id: &CorrelationId, ended: bool, now: Instant) {
        let Some(seq) = self.sequences.get_mut(id) else {
            return;
        };
        seq.running = false;
        seq.last_seen = now;
        if ended && seq.pending.is_empty() {
            self.release(id);
        }
    }

    fn release(&mut self, id: &CorrelationId) {
        if let Some(seq) = self.sequences.remove(id) {
            match seq.slot {
                Some(slot) => self.give_slot(slot),
                None => self.backlog.retain(|b| b != id),
            }
        }
    }

    fn give_slot(&mut self, slot: Slot) {
        while let Some(next) = self.backlog.pop_front() {
            if let Some(seq) = self.sequences.get_mut(&next) {
                seq.slot = Some(slot);
                return;
            }
        }
        self.free.insert(slot);
    }

    /// Ends sequences that have had no request for `idle` (Triton's reaper); returns them and the
    /// next time one may expire.
    pub fn reap_idle(
        &mut self,
        idle: Duration,
        now: Instant,
    ) -> (Vec<CorrelationId>, Option<Instant>) {
        let expired: Vec<CorrelationId> = self
            .sequences
            .iter()
            .filter(|(_, s)| !s.running && s.pending.is_empty() && now >= s.last_seen + idle)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            tracing::debug!(correlation_id = %id, "sequence idle past max_sequence_idle_microseconds; its slot is released");
            self.release(id);
        }
        let next = self
            .sequences
            .values()
            .filter(|s| !s.running && s.pending.is_empty())
            .map(|s| s.last_seen + idle)
            .min();
        (expired, next)
    }

    /// The next batch for `instance`: one request from each ready sequence it may run, at most
    /// `rows` of them; Oldest takes the longest-waiting first and waits up to its queue delay for
    /// a fuller batch.
    pub fn next_batch(
        &mut self,
        instance: usize,
        settings: &SequenceSettings,
        now: Instant,
    ) -> Next<P> {
        let rows = settings.max_batch_size.max(1);
        let mut ready: Vec<(Slot, Instant, CorrelationId)> = self
            .sequences
            .iter()
            .filter(|(_, s)| !s.running && !s.pending.is_empty())
            .filter_map(|(id, s)| {
                let slot = s.slot?;
                let mine = slot.instance.is_none_or(|i| i == instance);
                mine.then(|| {
                    (
                        slot,
                        s.pending.front().map(|p| p.1).unwrap_or(now),
                        id.clone(),
                    )
                })
            })
            .collect();
        if ready.is_empty() {
            return Next::Wait(None);
        }
        match settings.strategy {
            Strategy::Direct => ready.sort_by_key(|r| r.0.index),
            Strategy::Oldest { max_queue_delay } => {
                ready.sort_by_key(|r| r.1);
                let oldest = ready[0].1;
                if ready.len() < rows && !self.stopping && now < oldest + max_queue_delay {
                    return Next::Wait(Some(oldest + max_queue_delay));
                }
            }
        }
        ready.truncate(rows);
        let mut picked = Vec::with_capacity(ready.len());
        for (position, (slot, _, id)) in ready.into_iter().enumerate() {
            let Some(seq) = self.sequences.get_mut(&id) else {
                continue;
            };
            let Some((request, enqueued)) = seq.pending.pop_front() else {
                continue;
            };
            seq.running = true;
            self.queued -= 1;
            let row = match settings.strategy {
                Strategy::Direct => slot.index,
                Strategy::Oldest { .. } => position,
            };
            picked.push((row, id, request, enqueued));
        }
        Next::Run(picked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::sequence::settings::Strategy;

    fn settings(strategy: Strategy, mbs: usize, candidates: usize) -> SequenceSettings {
        SequenceSettings {
            model: "m".into(),
            max_batch_size: mbs,
            strategy,
            slots_per_instance: mbs.max(1),
            max_candidates: candidates,
            idle_timeout: Duration::from_secs(1),
            controls: vec![],
            states: vec![],
            max_queue: 100,
            outputs: vec![],
        }
    }

    fn id(n: u64) -> CorrelationId {
        CorrelationId::Uint(n)
    }

    #[test]
    fn direct_sequences_keep_their_slot_and_batch_together() {
        let s = settings(Strategy::Direct, 2, 2);
        let mut core = Core::new(&s, 1);
        let now = Instant::now();
        core.enqueue(id(1), "a1", now);
        core.enqueue(id(2), "b1", now);
        core.enqueue(id(3), "c1", now); // no slot left: backlog
        let Next::Run(rows) = core.next_batch(0, &s, now) else {
            panic!("expected a batch")
        };
        let got: Vec<_> = rows.iter().map(|r| (r.0, r.2)).collect();
        assert_eq!(got, vec![(0, "a1"), (1, "b1")]);
        // Sequence 1 ends: its slot (row 0) passes to the backlogged sequence 3.
        core.finish(&id(1), true, now);
        core.finish(&id(2), false, now);
        let Next::Run(rows) = core.next_batch(0, &s, now) else {
            panic!("expected a batch")
        };
        assert_eq!(
            rows.iter().map(|r| (r.0, r.2)).collect::<Vec<_>>(),
            vec![(0, "c1")]
        );
    }

    #[test]
    fn a_running_sequence_waits_for_its_previous_request() {
        let s = settings(Strategy::Direct, 4, 4);
        let mut core = Core::new(&s, 1);
        let now = Instant::now();
        core.enqueue(id(1), "a1", now);
        core.enqueue(id(1), "a2", now);
        assert!(matches!(core.next_batch(0, &s, now), Next::Run(r) if r.len() == 1));
        assert!(matches!(core.next_batch(0, &s, now), Next::Wait(None)));
        core.finish(&id(1), false, now);
        assert!(matches!(core.next_batch(0, &s, now), Next::Run(r) if r[0].2 == "a2"));
    }

    #[test]
    fn oldest_waits_for_a_fuller_batch_then_runs_oldest_first() {
        let delay = Duration::from_millis(10);
        let s = settings(
            Strategy::Oldest {
                max_queue_delay: delay,
            },
            2,
            8,
        );
        let mut core = Core::new(&s, 2);
        let t0 = Instant::now();
        core.enqueue(id(7), "x", t0);
        assert!(matches!(core.next_batch(1, &s, t0), Next::Wait(Some(t)) if t == t0 + delay));
        let Next::Run(rows) = core.next_batch(1, &s, t0 + delay) else {
            panic!()
        };
        assert_eq!(rows.len(), 1);
        core.finish(&id(7), false, t0);
        core.enqueue(id(9), "late", t0 + delay * 2);
        core.enqueue(id(7), "early", t0 + delay);
        let Next::Run(rows) = core.next_batch(0, &s, t0 + delay * 2) else {
            panic!()
        };
        assert_eq!(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            vec!["early", "late"]
        );
    }

    #[test]
    fn idle_sequences_are_released() {
        let s = settings(Strategy::Direct, 1, 1);
        let mut core = Core::new(&s, 1);
        let now = Instant::now();
        core.enqueue(id(1), "a", now);
        let _ = core.next_batch(0, &s, now);
        core.finish(&id(1), false, now);
        assert!(core.reap_idle(Duration::from_secs(1), now).1.is_some());
        assert!(core.sequences.contains_key(&id(1)));
        let (released, _) = core.reap_idle(Duration::from_secs(1), now + Duration::from_secs(2));
        assert_eq!(released, vec![id(1)]);
        assert!(!core.sequences.contains_key(&id(1)));
        core.enqueue(id(2), "b", now);
        assert!(core.sequences[&id(2)].slot.is_some(), "the slot came back");
    }
}
