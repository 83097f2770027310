//! Retention the stream's own limits cannot express: a count per channel pattern, and an age shorter
//! than the stream's for some patterns. One node at a time applies it (the holder of a lease in the
//! `<prefix>-lease` bucket, which expires if that node dies), every `log.prune_interval`, a bounded number
//! of channels per pass, resuming where the last pass stopped.
//!
//! Every removal is recorded first (`<prefix>-pruned`) and then made with a purge bounded by sequence, so
//! a reader never sees history gone without its mark, and a publication racing with the purge is kept.

use std::collections::BTreeMap;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::kv;
use futures_util::TryStreamExt;

use super::{codec, storage, within, Shared};
use crate::log::LogError;

/// Channels one pass works on (reads or purges), at most.
const WORK_PER_PASS: usize = 256;
const LEASE_KEY: &str = "retention";

/// Whether any rule needs the pass: a count, or an age the stream's limit does not already apply.
fn needed(shared: &Shared) -> bool {
    shared.retention.rules.iter().any(|r| {
        r.max_count.is_some()
            || r.max_age
                .is_some_and(|a| shared.stream_max_age.is_zero() || a < shared.stream_max_age)
    })
}

pub(crate) async fn run(shared: Arc<Shared>, lease: kv::Store) {
    if !needed(&shared) {
        return;
    }
    let node = uuid::Uuid::new_v4().simple().to_string();
    let mut held: Option<u64> = None; // the lease's revision while this node holds it
    let mut resume = String::new();
    let mut tick = tokio::time::interval(shared.prune_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stop.cancelled() => return,
        }
        if shared.connected().is_err() {
            continue;
        }
        let value = bytes::Bytes::from(node.clone());
        held = match held {
            Some(rev) => lease.update(LEASE_KEY, value, rev).await.ok(),
            None => lease.create(LEASE_KEY, value).await.ok(),
        };
        if held.is_none() {
            continue;
        }
        match pass(&shared, &resume).await {
            Ok(next) => resume = next,
            Err(e) => tracing::warn!(error = %e, "nats: retention pass failed"),
        }
    }
}

/// One pass over the channels after `after` (by token), working on at most [`WORK_PER_PASS`] of them;
/// returns where the next pass resumes (`""`: from the start).
async fn pass(shared: &Shared, after: &str) -> Result<String, LogError> {
    let stream = within(
        shared.op_timeout,
        "stream info",
        shared.js.get_stream(&shared.names.stream),
    )
    .await?;
    // Per channel token: its records (single-topic and with alternates together).
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut subjects = within(
        shared.op_timeout,
        "subjects",
        stream.info_with_subjects(shared.names.stream_subjects()),
    )
    .await?;
    while let Some((subject, n)) =
        within(shared.op_timeout, "subjects", subjects.try_next()).await?
    {
        if let Some(t) = shared.names.channel_token_of(&subject) {
            *counts.entry(t.to_string()).or_default() += n as u64;
        }
    }
    // Looking at a channel is free (its count is in the listing); the work is bounded instead: at most
    // WORK_PER_PASS channels that need a look at the server, then the next pass resumes after the last.
    let mut removed = 0u64;
    let mut work = 0usize;
    let mut last = after.to_string(); // the last channel looked at
    let range = (std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded);
    for (token, &count) in counts.range::<str, _>(range) {
        if work >= WORK_PER_PASS {
            if removed > 0 {
                tracing::debug!(removed, "nats: retention applied");
            }
            return Ok(last);
        }
        last.clone_from(token);
        let name = codec::untoken(token);
        if let Some(name) = &name {
            let Some(rule) = shared.retention.rule_for(name) else {
                continue;
            };
            let by_count = rule.max_count.is_some_and(|max| count > max);
            if !by_count && age_for(shared, rule).is_none() {
                continue;
            }
        }
        work += 1;
        removed += channel(shared, token, name, count).await?;
    }
    if removed > 0 {
        tracing::debug!(removed, "nats: retention applied");
    }
    Ok(String::new())
}

/// The age the pass applies for `rule` (one the stream's own limit does not already apply).
fn age_for(shared: &Shared, rule: &crate::log::RetentionRule) -> Option<Duration> {
    rule.max_age
        .filter(|a| shared.stream_max_age.is_zero() || *a < shared.stream_max_age)
}

/// Applies its rule to one channel; returns how many records it removed.
async fn channel(
    shared: &Shared,
    token: &str,
    name: Option<String>,
    count: u64,
) -> Result<u64, LogError> {
    let filter = format!("{}.pub.{token}.*", shared.names.prefix);
    let name = match name {
        Some(n) => n,
        // A hashed name: the channel's own records say what it is.
        None => match shared.first_from(&filter, 1).await? {
            Some(r) => r.channel().to_string(),
            None => return Ok(0),
        },
    };
    let Some(rule) = shared.retention.rule_for(&name) else {
        return Ok(0);
    };
    let mut cut = 0u64; // remove every record of the channel below this seq
    if let Some(max) = rule.max_count {
        if count > max {
            let doomed = shared
                .first_seqs(filter.clone(), DeliverPolicy::All, count - max)
                .await?;
            cut = doomed.last().map_or(0, |s| s + 1);
        }
    }
    if let Some(age) = rule
        .max_age
        .filter(|a| shared.stream_max_age.is_zero() || *a < shared.stream_max_age)
    {
        let cutoff = time::OffsetDateTime::now_utc() - age;
        let oldest = shared.first_from(&filter, 1).await?;
        let expired = oldest
            .as_ref()
            .is_some_and(|r| r.time_ms < (cutoff.unix_timestamp_nanos() / 1_000_000) as i64);
        if expired {
            let kept = shared
                .first_seqs(
                    filter.clone(),
                    DeliverPolicy::ByStartTime { start_time: cutoff },
                    1,
                )
                .await?;
            let by_age = match kept.first() {
                Some(&k) => k,
                None => shared.last_of(&filter).await?.map_or(0, |r| r.seq + 1),
            };
            cut = cut.max(by_age);
        }
    }
    if cut <= 1 {
        return Ok(0);
    }
    shared.raise_pruned(&name, cut - 1).await?;
    let stream = shared.stream_handle().await?;
    let purged = within(
        shared.op_timeout,
        "purge",
        stream.purge().filter(filter).sequence(cut).into_future(),
    )
    .await
    .map_err(|e| storage(format!("retention of {name}: {e}")))?;
    Ok(purged.purged)
}
