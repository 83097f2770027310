//! In-memory log: for tests and for deployments that accept losing history on restart. Its epoch is random
//! per process, so clients resuming across a restart learn that history was lost.

use std::collections::VecDeque;

use parking_lot::RwLock;

use super::{Log, LogError, Record, Retention};

pub struct MemoryLog {
    inner: RwLock<Inner>,
    epoch: String,
}

struct Inner {
    records: VecDeque<Record>,
    next_seq: u64,
    pruned: std::collections::HashMap<String, u64>,
}

impl MemoryLog {
    pub fn new() -> Self {
        MemoryLog {
            inner: RwLock::new(Inner {
                records: VecDeque::new(),
                next_seq: 1,
                pruned: Default::default(),
            }),
            epoch: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
        }
    }
}

impl Default for MemoryLog {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    /// Index of the first record with seq > `after` (records are sorted by seq).
    fn start(&self, after: u64) -> usize {
        self.records.partition_point(|r| r.seq <= after)
    }
}

impl Log for MemoryLog {
    fn append(&self, batch: &mut [Record]) -> Result<(), LogError> {
        let mut inner = self.inner.write();
        for r in batch.iter_mut() {
            r.seq = inner.next_seq;
            inner.next_seq += 1;
            if r.id.is_empty() {
                r.id = super::generated_id(&self.epoch, r.seq);
            }
            inner.records.push_back(r.clone());
        }
        Ok(())
    }

    fn read_range(&self, after: u64, upto: u64, limit: usize) -> Result<Vec<Record>, LogError> {
        let inner = self.inner.read();
        let start = inner.start(after);
        Ok(inner
            .records
            .range(start..)
            .take_while(|r| r.seq <= upto)
            .take(limit)
            .cloned()
            .collect())
    }

    fn read_channel(
        &self,
        channel: &str,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        let inner = self.inner.read();
        let start = inner.start(after);
        Ok(inner
            .records
            .range(start..)
            .take_while(|r| r.seq <= upto)
            .filter(|r| r.channel() == channel)
            .take(limit)
            .cloned()
            .collect())
    }

    fn read_channel_back(
        &self,
        channel: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        let inner = self.inner.read();
        let end = inner.start(before.saturating_sub(1));
        Ok(inner
            .records
            .range(..end)
            .rev()
            .filter(|r| r.channel() == channel)
            .take(limit)
            .cloned()
            .collect())
    }

    fn find_id(&self, id: &str) -> Result<Option<u64>, LogError> {
        let inner = self.inner.read();
        if let Some((epoch, seq)) = super::parse_generated_id(id) {
            let start = inner.start(seq.saturating_sub(1));
            let found = inner.records.get(start).is_some_and(|r| r.seq == seq);
            return Ok((epoch == self.epoch && found).then_some(seq));
        }
        Ok(inner
            .records
            .iter()
            .rev()
            .find(|r| r.id == id)
            .map(|r| r.seq))
    }

    fn last(&self) -> Result<Option<Record>, LogError> {
        Ok(self.inner.read().records.back().cloned())
    }

    fn channel_first_seq(&self, channel: &str) -> Result<Option<u64>, LogError> {
        let inner = self.inner.read();
        Ok(inner
            .records
            .iter()
            .find(|r| r.channel() == channel)
            .map(|r| r.seq))
    }

    fn channel_top(&self, channel: &str, upto: u64) -> Result<Option<u64>, LogError> {
        let inner = self.inner.read();
        let kept = inner
            .records
            .iter()
            .rev()
            .filter(|r| r.seq <= upto)
            .find(|r| r.channel() == channel)
            .map(|r| r.seq);
        let removed = inner.pruned.get(channel).copied().filter(|&p| p <= upto);
        Ok(kept.max(removed))
    }

    fn channel_pruned_upto(&self, channel: &str) -> Result<u64, LogError> {
        Ok(self.inner.read().pruned.get(channel).copied().unwrap_or(0))
    }

    fn read_topics(
        &self,
        after: u64,
        upto: u64,
        topics: &[String],
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        let inner = self.inner.read();
        let start = inner.start(after);
        Ok(inner
            .records
            .range(start..)
            .take_while(|r| r.seq <= upto)
            .filter(|r| r.topics.iter().any(|t| topics.contains(t)))
            .take(limit)
            .cloned()
            .collect())
    }

    fn prune_step(
        &self,
        retention: &Retention,
        now_ms: i64,
        after: &str,
        max_channels: usize,
    ) -> Result<(u64, Option<String>), LogError> {
        let mut guard = self.inner.write();
        let inner = &mut *guard;
        // This step's channels: the first `max_channels` names after `after`.
        let mut channels: Vec<&str> = inner
            .records
            .iter()
            .map(Record::channel)
            .filter(|c| *c > after)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let resume =
            (channels.len() > max_channels).then(|| channels[max_channels - 1].to_string());
        channels.truncate(max_channels);
        let step: std::collections::HashSet<String> =
            channels.into_iter().map(str::to_string).collect();
        let pruned = &mut inner.pruned;
        let mut counts: std::collections::HashMap<String, u64> = Default::default();
        for r in inner.records.iter().filter(|r| step.contains(r.channel())) {
            *counts.entry(r.channel().to_string()).or_default() += 1;
        }
        let before = inner.records.len();
        // Walk oldest first; a record goes while its channel holds more than the rule's count.
        let mut kept = VecDeque::with_capacity(before);
        for r in inner.records.drain(..) {
            let rule = retention
                .rule_for(r.channel())
                .filter(|_| step.contains(r.channel()));
            let Some(rule) = rule else {
                kept.push_back(r);
                continue;
            };
            let count = counts.get_mut(r.channel()).map(|c| *c).unwrap_or(0);
            let over_count = rule.max_count.is_some_and(|max| count > max);
            let too_old = rule
                .max_age
                .is_some_and(|age| r.time_ms < now_ms - age.as_millis() as i64);
            if over_count || too_old {
                if let Some(c) = counts.get_mut(r.channel()) {
                    *c -= 1;
                }
                let p = pruned.entry(r.channel().to_string()).or_default();
                *p = (*p).max(r.seq);
            } else {
                kept.push_back(r);
            }
        }
        inner.records = kept;
        Ok(((before - inner.records.len()) as u64, resume))
    }

    fn trim_channel(&self, channel: &str, upto: u64) -> Result<u64, LogError> {
        let mut inner = self.inner.write();
        let before = inner.records.len();
        if let Some(top) = inner
            .records
            .iter()
            .filter(|r| r.channel() == channel && r.seq <= upto)
            .map(|r| r.seq)
            .max()
        {
            let p = inner.pruned.entry(channel.to_string()).or_default();
            *p = (*p).max(top);
        }
        inner
            .records
            .retain(|r| r.channel() != channel || r.seq > upto);
        Ok((before - inner.records.len()) as u64)
    }

    fn channels(&self, prefix: &str, after: &str, limit: usize) -> Result<Vec<String>, LogError> {
        let inner = self.inner.read();
        let set: std::collections::BTreeSet<&str> = inner
            .records
            .iter()
            .map(Record::channel)
            .filter(|c| c.starts_with(prefix) && *c > after)
            .collect();
        Ok(set.into_iter().take(limit).map(str::to_string).collect())
    }

    fn epoch(&self) -> String {
        self.epoch.clone()
    }

    fn flush(&self) -> Result<(), LogError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::contract;
    use super::*;

    #[test]
    fn contract_append() {
        contract::append_assigns_increasing_seqs(&MemoryLog::new());
    }

    #[test]
    fn contract_retention() {
        contract::retention_by_count_and_age(&MemoryLog::new());
    }

    #[test]
    fn contract_generated_ids() {
        contract::generated_ids_name_the_position(&MemoryLog::new());
    }
}
