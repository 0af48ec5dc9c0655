//! Drops messages from other nodes that arrive twice.
//!
//! Every backplane message carries its origin node and a per-origin sequence number. A
//! backplane may hand a message over twice (a publish retried after its answer was lost, a
//! stream read again after a reconnect); the receiving node remembers, per origin, the highest
//! number seen and which of the [`WINDOW`] numbers below it arrived, and drops repeats.
//! Messages from one origin may arrive out of order (a node publishes from several tasks at
//! once), which the window allows for. A number older than the window cannot be told from a
//! repeat; it is delivered (and counted), so a message is never dropped for being late.

use std::collections::HashMap;
use std::sync::Mutex;

use switchboard_core::{MessageId, NodeId};
use tokio::time::Instant;

/// How many sequence numbers below the highest seen are remembered per origin.
pub(crate) const WINDOW: u64 = 4096;

/// Most origins remembered; past it the one heard from longest ago is forgotten (nodes get a
/// fresh id at every start, so old ones stop sending).
const MAX_ORIGINS: usize = 1024;

const WORDS: usize = (WINDOW / 64) as usize;

/// What one origin sent recently.
#[derive(Debug)]
struct Window {
    /// The highest sequence number seen.
    top: u64,
    /// Bit `i` set: `top - i` was seen (bit 0 is `top` itself).
    seen: [u64; WORDS],
    last_heard: Instant,
}

impl Window {
    fn new(seq: u64, now: Instant) -> Self {
        let mut seen = [0; WORDS];
        seen[0] = 1;
        Self {
            top: seq,
            seen,
            last_heard: now,
        }
    }

    /// Records `seq`; returns whether it was new.
    fn record(&mut self, seq: u64) -> Verdict {
        if seq > self.top {
            self.shift(seq - self.top);
            self.top = seq;
            self.seen[0] |= 1;
            return Verdict::New;
        }
        let back = self.top - seq;
        if back >= WINDOW {
            return Verdict::TooOld;
        }
        let (word, bit) = ((back / 64) as usize, back % 64);
        let mask = 1u64 << bit;
        if self.seen[word] & mask != 0 {
            Verdict::Repeat
        } else {
            self.seen[word] |= mask;
            Verdict::New
        }
    }

    /// Moves every remembered number `by` places further from the top.
    fn shift(&mut self, by: u64) {
        if by >= WINDOW {
            self.seen = [0; WORDS];
            return;
        }
        let (words, bits) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..WORDS).rev() {
            let from = i.checked_sub(words);
            let high = from.map_or(0, |j| self.seen[j]);
            let carry = match from.and_then(|j| j.checked_sub(1)) {
                Some(k) if bits > 0 => self.seen[k] >> (64 - bits),
                _ => 0,
            };
            self.seen[i] = if bits == 0 {
                high
            } else {
                (high << bits) | carry
            };
        }
    }
}

/// What [`Seen::check`] made of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not seen before: deliver it.
    New,
    /// Seen before: drop it.
    Repeat,
    /// Older than the window: delivered, as it cannot be told from a late original.
    TooOld,
}

/// The recent messages of every origin.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    origins: Mutex<HashMap<NodeId, Window>>,
}

impl Seen {
    /// Records the message `id`; says whether to deliver it.
    pub(crate) fn check(&self, id: &MessageId) -> Verdict {
        let now = Instant::now();
        let mut origins = self.origins.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(window) = origins.get_mut(&id.origin) {
            window.last_heard = now;
            return window.record(id.seq);
        }
        if origins.len() >= MAX_ORIGINS
            && let Some(oldest) = origins
                .iter()
                .min_by_key(|(_, w)| w.last_heard)
                .map(|(origin, _)| origin.clone())
        {
            origins.remove(&oldest);
        }
        origins.insert(id.origin.clone(), Window::new(id.seq, now));
        Verdict::New
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(origin: &str, seq: u64) -> MessageId {
        MessageId {
            origin: NodeId::new(origin).expect("valid"),
            seq,
        }
    }

    #[test]
    fn repeats_are_dropped_and_late_messages_within_the_window_are_not() {
        let seen = Seen::default();
        assert_eq!(seen.check(&id("a", 1)), Verdict::New);
        assert_eq!(seen.check(&id("a", 1)), Verdict::Repeat);
        assert_eq!(seen.check(&id("a", 5)), Verdict::New);
        // 2..4 arrive late (published from other tasks): all new, once.
        for seq in [3, 2, 4] {
            assert_eq!(seen.check(&id("a", seq)), Verdict::New, "{seq}");
            assert_eq!(seen.check(&id("a", seq)), Verdict::Repeat, "{seq}");
        }
        // Another origin has its own numbers.
        assert_eq!(seen.check(&id("b", 1)), Verdict::New);
        // Far ahead: the window slides; what falls out of it is too old to judge.
        assert_eq!(seen.check(&id("a", 5 + WINDOW)), Verdict::New);
        assert_eq!(seen.check(&id("a", 5)), Verdict::TooOld);
        assert_eq!(seen.check(&id("a", 6)), Verdict::New);
        assert_eq!(seen.check(&id("a", 6)), Verdict::Repeat);
    }

    #[test]
    fn the_window_matches_a_set_of_everything_seen() {
        // A model check over an irregular sequence: jumps of every size, repeats, late ones.
        let seen = Seen::default();
        let mut model = std::collections::BTreeSet::new();
        let mut top = 0u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let seq = match x % 4 {
                0 => top + 1 + (x >> 8) % 130,
                _ => top.saturating_sub((x >> 8) % 200).max(1),
            };
            let verdict = seen.check(&id("n", seq));
            let expected = if top >= WINDOW && seq <= top - WINDOW {
                Verdict::TooOld
            } else if model.contains(&seq) {
                Verdict::Repeat
            } else {
                Verdict::New
            };
            assert_eq!(verdict, expected, "seq {seq}, top {top}");
            model.insert(seq);
            top = top.max(seq);
        }
    }

    #[test]
    fn old_origins_are_forgotten_past_the_limit() {
        let seen = Seen::default();
        for i in 0..(MAX_ORIGINS + 10) {
            assert_eq!(seen.check(&id(&format!("n{i}"), 1)), Verdict::New);
        }
        assert!(seen.origins.lock().expect("lock").len() <= MAX_ORIGINS);
    }
}
