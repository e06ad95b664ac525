//! Admission and step planning: which sequences run, and how many tokens each feeds
//! in the next step. Pure bookkeeping, no model: the worker carries the plans out.
//!
//! Invariants:
//! - a step never feeds more than `max_step_tokens` tokens;
//! - every running sequence that is decoding (one token to feed) is in every step,
//!   before any prefill chunk, so a long prompt never stalls the decoders;
//! - while any sequence decodes, a step's prefill chunks add at most
//!   `max_prefill_while_decoding` tokens, so the step costs about what a decode
//!   step costs (prefill runs at the full `max_step_tokens` only when nobody waits
//!   on the step for their next token);
//! - admission is first come, first served: a request that does not fit blocks the
//!   ones behind it;
//! - the KV bytes of all live caches (waiting, running, and idle ones held by agents)
//!   never grow past the budget through an admission.

use std::collections::VecDeque;

/// Identifies a request inside the engine.
pub type SeqId = u64;
/// Identifies an idle cache holder (an agent) registered for eviction.
pub type HolderId = u64;

/// Limits of the scheduler.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SchedulerConfig {
    /// Most tokens fed through the model in one step (decode tokens plus prefill
    /// chunks).
    pub max_step_tokens: usize,
    /// Most sequences running at once.
    pub max_running: usize,
    /// Budget of all live KV caches together, in bytes.
    pub kv_budget_bytes: usize,
    /// Most prefill tokens a step adds while sequences are decoding.
    pub max_prefill_while_decoding: usize,
}

impl SchedulerConfig {
    /// Whether a request needing `bytes` of KV could ever be admitted.
    pub fn admits(&self, bytes: usize) -> bool {
        bytes <= self.kv_budget_bytes
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_step_tokens: 512,
            max_running: 64,
            kv_budget_bytes: 4 << 30,
            max_prefill_while_decoding: 64,
        }
    }
}

#[derive(Debug, Clone)]
struct Waiting {
    id: SeqId,
    /// Bytes its cache holds now.
    bytes_now: usize,
    /// Bytes its cache will hold once admitted (room for the whole generation).
    bytes_needed: usize,
}

#[derive(Debug, Clone)]
struct Running {
    id: SeqId,
    /// Tokens it has left to feed: its prompt's remainder, or 1 when decoding.
    to_feed: usize,
    bytes: usize,
}

#[derive(Debug, Clone)]
struct Idle {
    holder: HolderId,
    bytes: usize,
    /// Holders in the middle of a tool call: asked last.
    last: bool,
    /// Registration order: least recently active first.
    order: u64,
    asked: bool,
}

/// The next step: what to admit, what to feed, whom to ask to evict.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StepPlan {
    /// Sequences admitted by this plan (their caches grow to `bytes_needed`).
    pub admitted: Vec<SeqId>,
    /// `(sequence, tokens to feed)`, decoders first, then prefill chunks.
    pub items: Vec<(SeqId, usize)>,
    /// Idle holders asked to drop their caches so that the queue can move.
    pub evict: Vec<HolderId>,
    /// Waiting requests whose caches are dropped so that the front can be admitted.
    pub preempt: Vec<SeqId>,
}

impl StepPlan {
    /// Tokens this step feeds.
    pub fn n_tokens(&self) -> usize {
        self.items.iter().map(|(_, n)| n).sum()
    }
}

/// The scheduler's state.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<Waiting>,
    running: Vec<Running>,
    idle: Vec<Idle>,
    next_order: u64,
}

impl Scheduler {
    /// An empty scheduler. `max_step_tokens` is raised to `max_running` if lower, so
    /// that every decoder always fits in a step.
    pub fn new(mut cfg: SchedulerConfig) -> Self {
        cfg.max_running = cfg.max_running.max(1);
        cfg.max_step_tokens = cfg.max_step_tokens.max(cfg.max_running);
        Self {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            idle: Vec::new(),
            next_order: 0,
        }
    }

    /// The limits in force.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a request whose cache holds `bytes_now` and will need `bytes_needed`
    /// once running, with `to_feed` tokens to prefill.
    pub fn submit(&mut self, id: SeqId, bytes_now: usize, bytes_needed: usize) {
        self.waiting.push_back(Waiting {
            id,
            bytes_now,
            bytes_needed: bytes_needed.max(bytes_now),
        });
    }

    /// Sets how many tokens a running sequence has left to feed.
    pub fn set_to_feed(&mut self, id: SeqId, n: usize) {
        if let Some(r) = self.running.iter_mut().find(|r| r.id == id) {
            r.to_feed = n;
        }
    }

    /// Removes a sequence, waiting or running (finished, cancelled, failed).
    pub fn remove(&mut self, id: SeqId) {
        self.waiting.retain(|w| w.id != id);
        self.running.retain(|r| r.id != id);
    }

    /// Registers an idle cache held outside the engine (it counts in the budget and
    /// may be asked to evict). Registering again refreshes its recency.
    pub fn hold(&mut self, holder: HolderId, bytes: usize, last: bool) {
        self.release(holder);
        self.next_order += 1;
        self.idle.push(Idle {
            holder,
            bytes,
            last,
            order: self.next_order,
            asked: false,
        });
    }

    /// Counts an idle cache as asked to evict (its bytes are on their way out: a
    /// spill being written), so that no further holder is asked for them.
    pub fn mark_asked(&mut self, holder: HolderId) {
        if let Some(i) = self.idle.iter_mut().find(|i| i.holder == holder) {
            i.asked = true;
        }
    }

    /// Forgets an idle cache (its holder took it back, or dropped it).
    pub fn release(&mut self, holder: HolderId) {
        self.idle.retain(|i| i.holder != holder);
    }

    /// Bytes of every live cache the scheduler knows of.
    pub fn live_bytes(&self) -> usize {
        self.waiting.iter().map(|w| w.bytes_now).sum::<usize>()
            + self.running.iter().map(|r| r.bytes).sum::<usize>()
            + self.idle.iter().map(|i| i.bytes).sum::<usize>()
    }

    /// Running and waiting sequence counts.
    pub fn counts(&self) -> (usize, usize) {
        (self.running.len(), self.waiting.len())
    }

    /// Whether nothing is waiting or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Plans the next step. `to_feed` of newly admitted sequences is given by
    /// `prompt_len`.
    pub fn plan(&mut self, mut prompt_len: impl FnMut(SeqId) -> usize) -> StepPlan {
        let mut plan = StepPlan::default();
        while let Some(front) = self.waiting.front() {
            if self.running.len() >= self.cfg.max_running {
                break;
            }
            let growth = front.bytes_needed - front.bytes_now;
            let live = self.live_bytes();
            if live + growth > self.cfg.kv_budget_bytes {
                let need = live + growth - self.cfg.kv_budget_bytes;
                let (asked, covered) = self.ask_evictions(need);
                plan.evict = asked;
                if !covered {
                    // Idle caches cannot free enough: the caches of requests queued
                    // behind the front are dropped (newest first); they restart from
                    // an empty cache (their requester re-prefills).
                    plan.preempt = self.preempt_waiting(need);
                }
                break;
            }
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            plan.admitted.push(w.id);
            self.running.push(Running {
                id: w.id,
                to_feed: prompt_len(w.id),
                bytes: w.bytes_needed,
            });
        }
        let mut budget = self.cfg.max_step_tokens;
        let mut decoders = 0;
        for r in self.running.iter().filter(|r| r.to_feed == 1) {
            plan.items.push((r.id, 1));
            budget -= 1;
            decoders += 1;
        }
        if decoders > 0 {
            budget = budget.min(self.cfg.max_prefill_while_decoding.max(1));
        }
        for r in self.running.iter().filter(|r| r.to_feed > 1) {
            if budget == 0 {
                break;
            }
            let n = r.to_feed.min(budget);
            plan.items.push((r.id, n));
            budget -= n;
        }
        plan
    }

    /// Drops the caches of waiting requests behind the front, newest first, until
    /// `need` bytes are freed; returns them (the worker fails them as preempted).
    fn preempt_waiting(&mut self, need: usize) -> Vec<SeqId> {
        let mut freed = 0;
        let mut out = Vec::new();
        for w in self.waiting.iter_mut().skip(1).rev() {
            if freed >= need {
                break;
            }
            if w.bytes_now > 0 {
                freed += w.bytes_now;
                out.push(w.id);
            }
        }
        self.waiting.retain(|w| !out.contains(&w.id));
        out
    }

    /// Asks idle holders, least recently active first (tool-call holders last), to
    /// evict until `need` bytes would be freed; holders already asked count as freed.
    /// Returns the holders asked now, and whether the asks cover `need`.
    fn ask_evictions(&mut self, need: usize) -> (Vec<HolderId>, bool) {
        let pending: usize = self.idle.iter().filter(|i| i.asked).map(|i| i.bytes).sum();
        if pending >= need {
            return (Vec::new(), true);
        }
        let mut order: Vec<usize> = (0..self.idle.len())
            .filter(|&i| !self.idle[i].asked)
            .collect();
        order.sort_by_key(|&i| (self.idle[i].last, self.idle[i].order));
        let mut freed = pending;
        let mut asked = Vec::new();
        for i in order {
            if freed >= need {
                break;
            }
            self.idle[i].asked = true;
            freed += self.idle[i].bytes;
            asked.push(self.idle[i].holder);
        }
        (asked, freed >= need)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(max_step_tokens: usize, max_running: usize, budget: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_step_tokens,
            max_running,
            kv_budget_bytes: budget,
            max_prefill_while_decoding: usize::MAX,
        })
    }

    /// With decoders running, no step's prefill chunks exceed the bound, whatever
    /// the prompts; with no decoder a prefill takes the whole step budget.
    #[test]
    fn prefill_is_bounded_while_sequences_decode() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_step_tokens: 512,
            max_running: 16,
            kv_budget_bytes: usize::MAX,
            max_prefill_while_decoding: 48,
        });
        let mut to_feed = std::collections::HashMap::new();
        // Alone, a long prompt is prefilled 512 tokens at a time.
        to_feed.insert(0u64, 700usize);
        s.submit(0, 0, 0);
        let p = s.plan(|id| to_feed[&id]);
        assert_eq!(p.items, vec![(0, 512)]);
        s.set_to_feed(0, 1);
        // Then six more prompts of various lengths arrive while 0 decodes.
        for (id, n) in [
            (1u64, 300usize),
            (2, 40),
            (3, 5),
            (4, 1000),
            (5, 47),
            (6, 49),
        ] {
            to_feed.insert(id, n);
            s.submit(id, 0, 0);
        }
        let mut left: std::collections::HashMap<u64, usize> = to_feed.clone();
        left.insert(0, 1);
        for _ in 0..200 {
            let p = s.plan(|id| to_feed[&id]);
            let decoding: Vec<_> = p.items.iter().filter(|(_, n)| *n == 1).collect();
            let prefill: usize = p
                .items
                .iter()
                .filter(|(id, n)| *n > 1 || left[id] > 1)
                .map(|(_, n)| n)
                .sum();
            if !decoding.is_empty() {
                assert!(prefill <= 48, "prefill {prefill} with decoders: {p:?}");
            }
            for &(id, n) in &p.items {
                let l = left.get_mut(&id).unwrap();
                if *l > 1 {
                    *l -= n;
                    // A finished prefill decodes from then on.
                    let now = (*l).max(1);
                    *l = now;
                    s.set_to_feed(id, now);
                }
            }
            if left.values().all(|&l| l == 1) {
                return;
            }
        }
        panic!("prefills did not finish: {left:?}");
    }

    #[test]
    fn long_prefill_never_stalls_decoders_and_budget_holds() {
        let mut s = sched(64, 8, usize::MAX);
        let mut prompts = std::collections::HashMap::new();
        for id in 0..4 {
            prompts.insert(id, 1);
            s.submit(id, 0, 0);
        }
        let p = s.plan(|id| prompts[&id]);
        assert_eq!(p.admitted, vec![0, 1, 2, 3]);
        // A 4,000-token prompt arrives while four sequences decode.
        prompts.insert(9, 4000);
        s.submit(9, 0, 0);
        let mut prefilled = 0;
        let mut steps = 0;
        while prefilled < 4000 {
            let p = s.plan(|id| prompts[&id]);
            assert!(p.n_tokens() <= 64, "step of {} tokens", p.n_tokens());
            for id in 0..4 {
                assert!(p.items.contains(&(id, 1)), "decoder {id} skipped: {p:?}");
            }
            let chunk = p
                .items
                .iter()
                .find(|(id, _)| *id == 9)
                .map_or(0, |(_, n)| *n);
            assert_eq!(chunk, 60.min(4000 - prefilled));
            prefilled += chunk;
            s.set_to_feed(9, 4000 - prefilled);
            steps += 1;
        }
        assert_eq!(steps, 67);
    }

    #[test]
    fn admission_is_fifo_and_bounded_by_max_running() {
        let mut s = sched(100, 2, usize::MAX);
        for id in 0..5 {
            s.submit(id, 0, 0);
        }
        assert_eq!(s.plan(|_| 5).admitted, vec![0, 1]);
        assert!(s.plan(|_| 5).admitted.is_empty());
        s.remove(0);
        assert_eq!(s.plan(|_| 5).admitted, vec![2]);
        assert_eq!(s.counts(), (2, 2));
    }

    #[test]
    fn budget_blocks_admission_and_asks_lru_idle_holders_to_evict() {
        let mut s = sched(100, 8, 1000);
        s.hold(1, 300, false);
        s.hold(2, 300, true);
        s.hold(3, 300, false);
        s.submit(10, 0, 400);
        let p = s.plan(|_| 3);
        assert!(p.admitted.is_empty());
        // 900 + 400 - 1000 = 300 bytes needed: the least recent non-tool holder.
        assert_eq!(p.evict, vec![1]);
        // Asked once, not again while the eviction is pending.
        assert!(s.plan(|_| 3).evict.is_empty());
        s.release(1);
        let p = s.plan(|_| 3);
        assert_eq!(p.admitted, vec![10]);
        assert_eq!(s.live_bytes(), 1000);
        // Tool-call holders go last.
        s.submit(11, 0, 500);
        assert_eq!(s.plan(|_| 3).evict, vec![3, 2]);
    }
}
