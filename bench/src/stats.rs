//! Counters: per-subscriber loss/duplicate detection by sequence number, per-message arrival tracking (time
//! for one message to reach all its subscribers), and latency histograms.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use hdrhistogram::Histogram;
use parking_lot::Mutex;

static START: OnceLock<Instant> = OnceLock::new();

/// Microseconds since the process-wide start: one monotonic clock shared by the publisher (which writes
/// it into the payload) and the subscribers (which read it back).
pub fn now_us() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Sequence numbers `0..expected` of one channel as seen by one subscriber. Memory stays O(1) unless
/// something is wrong: only the gaps are remembered, as ranges, so a late arrival is told apart from a
/// duplicate.
#[derive(Debug, Default, Clone)]
pub struct LossCounter {
    /// One past the highest sequence seen.
    next: u64,
    /// Skipped sequences not seen since, as sorted half-open ranges.
    missing: Vec<(u64, u64)>,
    pub received: u64,
    pub duplicates: u64,
    /// Arrived after a later one (filled a gap): not lost, but out of order.
    pub reordered: u64,
}

impl LossCounter {
    pub fn observe(&mut self, k: u64) {
        self.received += 1;
        if k == self.next {
            self.next += 1;
        } else if k > self.next {
            self.missing.push((self.next, k));
            self.next = k + 1;
        } else {
            // Binary search for the gap holding k, if any.
            let i = self.missing.partition_point(|&(_, end)| end <= k);
            match self.missing.get(i).copied() {
                Some((a, b)) if a <= k && k < b => {
                    self.reordered += 1;
                    let mut parts = Vec::with_capacity(2);
                    if a < k {
                        parts.push((a, k));
                    }
                    if k + 1 < b {
                        parts.push((k + 1, b));
                    }
                    self.missing.splice(i..i + 1, parts);
                }
                _ => self.duplicates += 1,
            }
        }
    }

    /// Sequences in `0..expected` never seen, not counting those in `unpublished` (publishes that failed,
    /// so were never sent to anyone).
    pub fn lost(&self, expected: u64, unpublished: &[u64]) -> u64 {
        let in_gaps: u64 = self
            .missing
            .iter()
            .map(|&(a, b)| b.min(expected).saturating_sub(a))
            .sum();
        let tail = expected.saturating_sub(self.next);
        let excused = unpublished
            .iter()
            .filter(|&&k| k < expected && (k >= self.next || self.is_missing(k)))
            .count() as u64;
        (in_gaps + tail).saturating_sub(excused)
    }

    fn is_missing(&self, k: u64) -> bool {
        let i = self.missing.partition_point(|&(_, end)| end <= k);
        matches!(self.missing.get(i), Some(&(a, b)) if a <= k && k < b)
    }

    /// Sequences at or beyond `expected` (never published: a bug in the bench or the server).
    pub fn unexpected(&self, expected: u64) -> u64 {
        self.next.saturating_sub(expected)
    }
}

/// What happened to each message: when it was sent, how many subscribers got it, and when the last did.
pub struct Tracker {
    sent_us: Vec<AtomicU64>,
    count: Vec<AtomicU32>,
    last_us: Vec<AtomicU64>,
}

pub const NOT_SENT: u64 = u64::MAX;

impl Tracker {
    pub fn new(messages: usize) -> Tracker {
        Tracker {
            sent_us: (0..messages).map(|_| AtomicU64::new(NOT_SENT)).collect(),
            count: (0..messages).map(|_| AtomicU32::new(0)).collect(),
            last_us: (0..messages).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.sent_us.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent_us.is_empty()
    }

    pub fn sent(&self, i: usize, t_us: u64) {
        if let Some(s) = self.sent_us.get(i) {
            s.store(t_us, Ordering::Relaxed);
        }
    }

    /// When message `i` was sent, if it was.
    pub fn sent_at(&self, i: usize) -> Option<u64> {
        let t = self.sent_us.get(i)?.load(Ordering::Relaxed);
        (t != NOT_SENT).then_some(t)
    }

    pub fn arrived(&self, i: usize, t_us: u64) {
        if let (Some(c), Some(l)) = (self.count.get(i), self.last_us.get(i)) {
            c.fetch_add(1, Ordering::Relaxed);
            l.fetch_max(t_us, Ordering::Relaxed);
        }
    }

    pub fn was_sent(&self, i: usize) -> bool {
        self.sent_us
            .get(i)
            .is_some_and(|s| s.load(Ordering::Relaxed) != NOT_SENT)
    }

    /// Time for message `i` to reach all `receivers`, if it did.
    pub fn reach_all_us(&self, i: usize, receivers: u32) -> Option<u64> {
        let sent = self.sent_us.get(i)?.load(Ordering::Relaxed);
        let count = self.count.get(i)?.load(Ordering::Relaxed);
        let last = self.last_us.get(i)?.load(Ordering::Relaxed);
        (sent != NOT_SENT && count >= receivers && receivers > 0).then(|| last.saturating_sub(sent))
    }

    /// First send and last arrival over all messages (the span deliveries per second is measured over).
    pub fn span_us(&self) -> Option<(u64, u64)> {
        self.span_us_in(0..self.len())
    }

    /// First send and last arrival over the messages in `range` (one phase of a rate search).
    pub fn span_us_in(&self, range: std::ops::Range<usize>) -> Option<(u64, u64)> {
        let end = range.end.min(self.sent_us.len());
        let start = range.start.min(end);
        let first = self.sent_us[start..end]
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .filter(|&s| s != NOT_SENT)
            .min()?;
        let last = self.last_us[start..end]
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .max()?;
        Some((first, last))
    }
}

/// A histogram in microseconds (1 µs .. 10 min, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that `new_with_bounds` accepts; fall back to an auto-resizing one.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| unreachable_histogram())
}

fn unreachable_histogram() -> Histogram<u64> {
    // `Histogram::new(3)` only fails for sigfig > 5; this is never reached.
    match Histogram::new(2) {
        Ok(h) => h,
        Err(_) => std::process::abort(),
    }
}

/// Histograms sharded by subscriber, so 10 000 subscribers on 2 threads rarely wait for one lock.
pub struct Sharded {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Sharded {
    pub fn new(n: usize) -> Sharded {
        Sharded {
            shards: (0..n.max(1)).map(|_| Mutex::new(histogram())).collect(),
        }
    }

    pub fn record(&self, shard: usize, v: u64) {
        let mut h = self.shards[shard % self.shards.len()].lock();
        h.saturating_record(v.max(1));
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for s in &self.shards {
            let _ = all.add(&*s.lock());
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_is_clean() {
        let mut c = LossCounter::default();
        for k in 0..100 {
            c.observe(k);
        }
        assert_eq!((c.received, c.duplicates, c.reordered), (100, 0, 0));
        assert_eq!(c.lost(100, &[]), 0);
        assert_eq!(c.unexpected(100), 0);
    }

    #[test]
    fn gaps_tail_and_duplicates() {
        let mut c = LossCounter::default();
        for k in [0, 1, 1, 4, 5, 5, 5, 9] {
            c.observe(k);
        }
        // missing: 2,3 and 6,7,8; tail 10,11
        assert_eq!(c.duplicates, 3);
        assert_eq!(c.reordered, 0);
        assert_eq!(c.lost(12, &[]), 7);
        assert_eq!(c.lost(10, &[]), 5);
        // unpublished sequences are not losses
        assert_eq!(c.lost(12, &[3, 7, 11]), 4);
        // a published one that was received does not excuse anything
        assert_eq!(c.lost(12, &[4]), 7);
    }

    #[test]
    fn late_arrivals_fill_gaps_then_repeat_as_duplicates() {
        let mut c = LossCounter::default();
        for k in [0, 5, 2, 1, 3, 4, 2, 6] {
            c.observe(k);
        }
        assert_eq!(c.reordered, 4);
        assert_eq!(c.duplicates, 1);
        assert_eq!(c.lost(7, &[]), 0);
        assert_eq!(c.unexpected(7), 0);
        assert_eq!(c.unexpected(5), 2);
    }

    #[test]
    fn nothing_received_loses_all() {
        let c = LossCounter::default();
        assert_eq!(c.lost(50, &[]), 50);
        assert_eq!(c.lost(50, &[0, 49]), 48);
    }

    #[test]
    fn tracker_reach_all() {
        let t = Tracker::new(3);
        t.sent(0, 100);
        t.arrived(0, 150);
        t.arrived(0, 130);
        t.sent(1, 200);
        t.arrived(1, 210);
        assert_eq!(t.reach_all_us(0, 2), Some(50));
        assert_eq!(t.reach_all_us(1, 2), None);
        assert_eq!(t.reach_all_us(2, 1), None);
        assert!(!t.was_sent(2));
        assert_eq!(t.span_us(), Some((100, 210)));
    }

    #[test]
    fn sharded_histogram_merges() {
        let h = Sharded::new(4);
        for i in 0..1000u64 {
            h.record(i as usize, i + 1);
        }
        let m = h.merged();
        assert_eq!(m.len(), 1000);
        assert!(m.value_at_quantile(0.5) >= 495 && m.value_at_quantile(0.5) <= 505);
    }
}
