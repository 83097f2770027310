//! Reads. JetStream reads forward: a range is an ephemeral pull consumer from `after + 1` with a filter
//! subject, drained with no-wait fetches until `upto`, `limit` or its pending count says there is no more;
//! a single message is a direct get (one round trip, served by any replica).

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use futures_util::StreamExt;

use super::{codec, storage, within, Shared};
use crate::log::{LogError, Record};

/// Messages asked for in one fetch.
const FETCH_BATCH: u64 = 256;
/// A read consumer left behind (its node died mid-read) disappears after this.
const READ_CONSUMER_TTL: Duration = Duration::from_secs(30);
/// The first window of a backward read, in positions per record asked for.
const BACK_WINDOW_PER_RECORD: u64 = 4;

impl Shared {
    pub(crate) async fn stream_handle(&self) -> Result<Stream<()>, LogError> {
        self.js
            .get_stream_no_info(&self.names.stream)
            .await
            .map_err(storage)
    }

    /// Records on `filter` with `after < seq <= upto` that `keep` accepts, ascending, at most `limit`.
    pub(crate) async fn scan(
        &self,
        filter: String,
        after: u64,
        upto: u64,
        limit: usize,
        keep: impl Fn(&Record) -> bool,
    ) -> Result<Vec<Record>, LogError> {
        if limit == 0 || after >= upto {
            return Ok(Vec::new());
        }
        let _permit = self.reads.acquire().await.map_err(|_| LogError::Closed)?;
        let stream = self.stream_handle().await?;
        let consumer = within(
            self.op_timeout,
            "read consumer",
            stream.create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                filter_subject: filter,
                ack_policy: AckPolicy::None,
                memory_storage: true,
                num_replicas: 1,
                inactive_threshold: READ_CONSUMER_TTL,
                ..Default::default()
            }),
        )
        .await?;
        let name = consumer.cached_info().name.clone();
        let mut pending = consumer.cached_info().num_pending;
        let epoch = self.epoch();
        let mut out = Vec::new();
        let read = async {
            'fetch: while pending > 0 && out.len() < limit {
                let mut batch = within(
                    self.op_timeout,
                    "fetch",
                    consumer
                        .fetch()
                        .max_messages(pending.min(FETCH_BATCH) as usize)
                        .messages(),
                )
                .await?;
                let mut got = 0;
                while let Some(m) = within(self.op_timeout, "fetch", async {
                    Ok::<_, LogError>(batch.next().await)
                })
                .await?
                {
                    let m = m.map_err(storage)?;
                    got += 1;
                    let info = m.info().map_err(storage)?;
                    let seq = info.stream_sequence;
                    pending = info.pending;
                    if seq > upto {
                        break 'fetch;
                    }
                    match codec::decode(seq, &m.payload, &epoch) {
                        Ok(r) if keep(&r) => {
                            out.push(r);
                            if out.len() >= limit {
                                break 'fetch;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "skipping a message that is not a record")
                        }
                    }
                }
                if got == 0 {
                    break;
                }
            }
            Ok::<_, LogError>(())
        };
        let result = read.await;
        // Not awaited: the reader has its records; the server drops the consumer anyway when idle.
        tokio::spawn(async move {
            let _ = stream.delete_consumer(&name).await;
        });
        result.map(|()| out)
    }

    /// Records having one of `topics` (canonical or alternate): each topic's channel subjects, plus the
    /// records with alternates (checked here), merged by seq.
    pub(crate) async fn read_topics(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
        topics: Vec<String>,
    ) -> Result<Vec<Record>, LogError> {
        let mut reads = Vec::with_capacity(topics.len() + 1);
        for t in &topics {
            let filter = self.names.channel_filter(t);
            let t = t.clone();
            reads.push(futures_util::future::Either::Left(async move {
                self.scan(filter, after, upto, limit, move |r| r.channel() == t)
                    .await
            }));
        }
        let wanted = &topics;
        reads.push(futures_util::future::Either::Right(self.scan(
            self.names.multi_filter(),
            after,
            upto,
            limit,
            move |r| r.topics.iter().skip(1).any(|t| wanted.contains(t)),
        )));
        let mut all: Vec<Record> = Vec::new();
        for part in futures_util::future::join_all(reads).await {
            all.extend(part?);
        }
        all.sort_by_key(|r| r.seq);
        all.dedup_by_key(|r| r.seq);
        all.truncate(limit);
        Ok(all)
    }

    /// Records of `channel` with `seq < before`, newest first, at most `limit`. JetStream cannot read
    /// backwards, so this reads forward over windows that grow fourfold towards the past, starting at the
    /// channel's newest record: the work is about twice what is returned for an evenly published channel,
    /// and never more than the channel's retained history (which retention bounds).
    pub(crate) async fn read_back(
        &self,
        channel: &str,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        if limit == 0 || before <= 1 {
            return Ok(Vec::new());
        }
        let filter = self.names.channel_filter(channel);
        let Some(newest) = self.last_of(&filter).await? else {
            return Ok(Vec::new());
        };
        if newest.seq < before && limit == 1 && newest.channel() == channel {
            return Ok(vec![newest]);
        }
        let end = before.min(newest.seq + 1); // exclusive
        let mut window = (limit as u64)
            .saturating_mul(BACK_WINDOW_PER_RECORD)
            .max(16);
        let mut hi = end; // exclusive upper bound of what is not read yet
        let mut found: Vec<Record> = Vec::new(); // newest first
        while hi > 1 && found.len() < limit {
            let lo = hi.saturating_sub(window).max(1);
            let part = self
                .scan(filter.clone(), lo - 1, hi - 1, usize::MAX, |r| {
                    r.channel() == channel
                })
                .await?;
            found.extend(part.into_iter().rev());
            hi = lo;
            window = window.saturating_mul(4);
        }
        found.truncate(limit);
        Ok(found)
    }

    /// The newest record on `filter`.
    pub(crate) async fn last_of(&self, filter: &str) -> Result<Option<Record>, LogError> {
        let stream = self.stream_handle().await?;
        let got = tokio::time::timeout(self.op_timeout, stream.direct_get_last_for_subject(filter))
            .await
            .map_err(|_| storage("direct get: no answer in time"))?;
        self.record_of(got)
    }

    /// The record at `seq`, if retained.
    pub(crate) async fn record_at(&self, seq: u64) -> Result<Option<Record>, LogError> {
        let stream = self.stream_handle().await?;
        let got = tokio::time::timeout(self.op_timeout, stream.direct_get(seq))
            .await
            .map_err(|_| storage("direct get: no answer in time"))?;
        self.record_of(got)
    }

    /// The first record on `filter` at or after `seq`.
    pub(crate) async fn first_from(
        &self,
        filter: &str,
        seq: u64,
    ) -> Result<Option<Record>, LogError> {
        let stream = self.stream_handle().await?;
        let got = tokio::time::timeout(
            self.op_timeout,
            stream.direct_get_next_for_subject(filter, Some(seq.max(1))),
        )
        .await
        .map_err(|_| storage("direct get: no answer in time"))?;
        self.record_of(got)
    }

    fn record_of(
        &self,
        got: Result<
            async_nats::jetstream::message::StreamMessage,
            async_nats::jetstream::stream::DirectGetError,
        >,
    ) -> Result<Option<Record>, LogError> {
        match got {
            Ok(m) => match codec::decode(m.sequence, &m.payload, &self.epoch()) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    tracing::warn!(error = %e, "a message of the log stream is not a record");
                    Ok(None)
                }
            },
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(e) => Err(storage(format!("direct get: {e}"))),
        }
    }
}

impl Shared {
    /// The seqs of the first `n` messages on `filter` from `start` (headers only: the payloads are not
    /// needed to know what is there).
    pub(crate) async fn first_seqs(
        &self,
        filter: String,
        start: DeliverPolicy,
        n: u64,
    ) -> Result<Vec<u64>, LogError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let stream = self.stream_handle().await?;
        let consumer = within(
            self.op_timeout,
            "retention consumer",
            stream.create_consumer(pull::Config {
                deliver_policy: start,
                filter_subject: filter,
                ack_policy: AckPolicy::None,
                memory_storage: true,
                num_replicas: 1,
                headers_only: true,
                inactive_threshold: READ_CONSUMER_TTL,
                ..Default::default()
            }),
        )
        .await?;
        let name = consumer.cached_info().name.clone();
        let mut pending = consumer.cached_info().num_pending.min(n);
        let mut out = Vec::new();
        let read = async {
            while pending > 0 {
                let mut batch = within(
                    self.op_timeout,
                    "fetch",
                    consumer
                        .fetch()
                        .max_messages(pending.min(FETCH_BATCH) as usize)
                        .messages(),
                )
                .await?;
                let before = out.len();
                while let Some(m) = within(self.op_timeout, "fetch", async {
                    Ok::<_, LogError>(batch.next().await)
                })
                .await?
                {
                    let m = m.map_err(storage)?;
                    out.push(m.info().map_err(storage)?.stream_sequence);
                }
                if out.len() == before {
                    break;
                }
                pending = pending.saturating_sub((out.len() - before) as u64);
            }
            Ok::<_, LogError>(())
        };
        let result = read.await;
        tokio::spawn(async move {
            let _ = stream.delete_consumer(&name).await;
        });
        result.map(|()| out)
    }
}
