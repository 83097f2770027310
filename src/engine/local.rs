//! The single-node engine: a [`Log`] on this machine (SQLite by default, or memory), no feed.
//!
//! Writes and reads are kept apart. Every write (appends, history removal, retention) runs on one thread
//! of its own, in order, so acknowledgements never wait behind reads on tokio's blocking pool: a reconnect
//! storm of replays cannot delay a publish. Reads run on the blocking pool, at most [`MAX_READS`] at a time
//! (beyond that they queue), which bounds how much of the pool and of SQLite's reader connections a storm
//! can take.
//!
//! Retention runs on the writer thread too, a bounded step at a time between writes: one step looks at a
//! few dozen channels, so a publish waits behind at most one step, never behind a whole-table scan.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{oneshot, Semaphore};

use super::{BoxFuture, Engine};
use crate::log::{Log, LogError, Record, Retention};

/// Reads in flight on the blocking pool at once.
pub const MAX_READS: usize = 8;
/// Channels one retention step looks at.
const PRUNE_STEP_CHANNELS: usize = 64;
/// Writes queued for the writer thread before appends wait.
const WRITER_QUEUE: usize = 1024;

enum Job {
    Append(Vec<Record>, oneshot::Sender<Result<Vec<Record>, LogError>>),
    /// Trim a channel up to a seq (`u64::MAX`: remove its history).
    Trim(String, u64, oneshot::Sender<Result<u64, LogError>>),
    /// Answered at once: proves the writer thread is alive and not stuck.
    Ping(oneshot::Sender<()>),
    Close(oneshot::Sender<Result<(), LogError>>),
}

pub struct LocalEngine {
    log: Arc<dyn Log>,
    writer: mpsc::SyncSender<Job>,
    reads: Arc<Semaphore>,
    epoch: String,
    /// False after a write failed, until one succeeds: `/readyz` reports it.
    writes_ok: Arc<AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl LocalEngine {
    /// Starts the writer thread for `log`, with retention applied every `prune_interval`.
    pub fn new(log: Arc<dyn Log>, retention: Retention, prune_interval: Duration) -> LocalEngine {
        let (writer, jobs) = mpsc::sync_channel(WRITER_QUEUE);
        let writes_ok = Arc::new(AtomicBool::new(true));
        let last_error = Arc::new(Mutex::new(None));
        let state = WriterState {
            log: log.clone(),
            retention,
            prune_interval: prune_interval.max(Duration::from_millis(10)),
            writes_ok: writes_ok.clone(),
            last_error: last_error.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("herald-writer".into())
            .spawn(move || state.run(jobs));
        if let Err(e) = spawned {
            // Without a thread every write fails with "writer stopped", and /readyz says so.
            tracing::error!(error = %e, "cannot start the log writer thread");
        }
        LocalEngine {
            epoch: log.epoch(),
            log,
            writer,
            reads: Arc::new(Semaphore::new(MAX_READS)),
            writes_ok,
            last_error,
        }
    }

    /// The underlying log (tests and tools).
    pub fn log(&self) -> &Arc<dyn Log> {
        &self.log
    }

    async fn write<T>(&self, job: impl FnOnce(oneshot::Sender<T>) -> Job) -> Result<T, LogError> {
        let (tx, rx) = oneshot::channel();
        let writer = self.writer.clone();
        let job = job(tx);
        // The queue is bounded: when it is full the sender blocks, so hand that to the blocking pool.
        match writer.try_send(job) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(job)) => {
                tokio::task::spawn_blocking(move || writer.send(job))
                    .await
                    .map_err(|_| stopped())?
                    .map_err(|_| stopped())?;
            }
            Err(mpsc::TrySendError::Disconnected(_)) => return Err(stopped()),
        }
        rx.await.map_err(|_| stopped())
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Log) -> Result<T, LogError> + Send + 'static,
    ) -> Result<T, LogError> {
        let _permit = self
            .reads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| LogError::Closed)?;
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || f(&*log))
            .await
            .map_err(|e| LogError::Storage(format!("log read task failed: {e}")))?
    }
}

fn stopped() -> LogError {
    LogError::Storage("the log writer has stopped".into())
}

impl Engine for LocalEngine {
    fn append(&self, batch: Vec<Record>) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(async move { self.write(|tx| Job::Append(batch, tx)).await? })
    }

    fn read_range(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
        topics: Option<Vec<String>>,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(self.read(move |log| match topics {
            Some(t) => log.read_topics(after, upto, &t, limit),
            None => log.read_range(after, upto, limit),
        }))
    }

    fn read_channel(
        &self,
        channel: String,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(self.read(move |log| log.read_channel(&channel, after, upto, limit)))
    }

    fn read_channel_back(
        &self,
        channel: String,
        before: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Record>, LogError>> {
        Box::pin(self.read(move |log| log.read_channel_back(&channel, before, limit)))
    }

    fn find_id(&self, id: String) -> BoxFuture<'_, Result<Option<u64>, LogError>> {
        Box::pin(self.read(move |log| log.find_id(&id)))
    }

    fn last(&self) -> BoxFuture<'_, Result<Option<Record>, LogError>> {
        Box::pin(self.read(|log| log.last()))
    }

    fn channel_top(
        &self,
        channel: String,
        upto: u64,
    ) -> BoxFuture<'_, Result<Option<u64>, LogError>> {
        Box::pin(self.read(move |log| log.channel_top(&channel, upto)))
    }

    fn channel_pruned_upto(&self, channel: String) -> BoxFuture<'_, Result<u64, LogError>> {
        Box::pin(self.read(move |log| log.channel_pruned_upto(&channel)))
    }

    fn remove_channel(&self, channel: String) -> BoxFuture<'_, Result<u64, LogError>> {
        self.trim_channel(channel, u64::MAX)
    }

    fn trim_channel(&self, channel: String, upto: u64) -> BoxFuture<'_, Result<u64, LogError>> {
        Box::pin(async move { self.write(|tx| Job::Trim(channel, upto, tx)).await? })
    }

    fn channels(
        &self,
        prefix: String,
        after: String,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<String>, LogError>> {
        Box::pin(self.read(move |log| log.channels(&prefix, &after, limit)))
    }

    fn epoch(&self) -> String {
        self.epoch.clone()
    }

    fn health(&self) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move {
            tokio::time::timeout(Duration::from_secs(5), self.write(Job::Ping))
                .await
                .map_err(|_| LogError::Storage("the log writer is not answering".into()))??;
            if !self.writes_ok.load(Ordering::Acquire) {
                let e = self.last_error.lock().clone().unwrap_or_default();
                return Err(LogError::Storage(format!("the last write failed: {e}")));
            }
            // A read proves the store answers at all.
            self.read(|log| log.last().map(|_| ())).await
        })
    }

    fn close(&self) -> BoxFuture<'_, Result<(), LogError>> {
        Box::pin(async move { self.write(Job::Close).await? })
    }
}

/// What the writer thread owns.
struct WriterState {
    log: Arc<dyn Log>,
    retention: Retention,
    prune_interval: Duration,
    writes_ok: Arc<AtomicBool>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl WriterState {
    fn run(self, jobs: mpsc::Receiver<Job>) {
        let mut next_prune = Instant::now() + self.prune_interval;
        // `Some(channel)`: a retention pass is under way and resumes after this channel.
        let mut pass: Option<String> = None;
        loop {
            let wait = if pass.is_some() {
                Duration::ZERO
            } else {
                next_prune.saturating_duration_since(Instant::now())
            };
            match jobs.recv_timeout(wait) {
                Ok(Job::Close(done)) => {
                    let _ = done.send(self.log.flush());
                    return;
                }
                Ok(job) => self.handle(job),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            // One bounded step per turn while a pass is under way, so writes keep flowing between steps.
            if self.retention.rules.is_empty() {
                continue;
            }
            if pass.is_none() && Instant::now() >= next_prune {
                pass = Some(String::new());
            }
            if let Some(after) = pass.take() {
                let now_ms = crate::hub::now_ms();
                match self
                    .log
                    .prune_step(&self.retention, now_ms, &after, PRUNE_STEP_CHANNELS)
                {
                    Ok((removed, resume)) => {
                        if removed > 0 {
                            tracing::debug!(removed, "retention applied");
                        }
                        pass = resume;
                    }
                    Err(e) => tracing::warn!(error = %e, "retention failed"),
                }
                if pass.is_none() {
                    next_prune = Instant::now() + self.prune_interval;
                }
            }
        }
    }

    fn handle(&self, job: Job) {
        match job {
            Job::Append(mut batch, done) => {
                let started = Instant::now();
                let result = self.log.append(&mut batch).map(|()| batch);
                metrics::histogram!("herald_log_append_seconds")
                    .record(started.elapsed().as_secs_f64());
                self.note(result.as_ref().err());
                let _ = done.send(result);
            }
            Job::Trim(channel, upto, done) => {
                let result = self.log.trim_channel(&channel, upto);
                self.note(result.as_ref().err());
                let _ = done.send(result);
            }
            Job::Ping(done) => {
                let _ = done.send(());
            }
            Job::Close(done) => {
                let _ = done.send(self.log.flush());
            }
        }
    }

    fn note(&self, error: Option<&LogError>) {
        match error {
            None => self.writes_ok.store(true, Ordering::Release),
            Some(e) => {
                *self.last_error.lock() = Some(e.to_string());
                self.writes_ok.store(false, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::log::MemoryLog;

    /// A memory log whose reads block until released, and whose appends fail while `fail` is set.
    struct Gated {
        inner: MemoryLog,
        started: AtomicUsize,
        gate: parking_lot::Condvar,
        open: Mutex<bool>,
        fail: AtomicBool,
    }

    impl Gated {
        fn wait(&self) {
            self.started.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.lock();
            while !*open {
                self.gate.wait(&mut open);
            }
        }
    }

    impl Log for Gated {
        fn append(&self, batch: &mut [Record]) -> Result<(), LogError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(LogError::Storage("disk full".into()));
            }
            self.inner.append(batch)
        }
        fn read_range(&self, a: u64, u: u64, l: usize) -> Result<Vec<Record>, LogError> {
            self.wait();
            self.inner.read_range(a, u, l)
        }
        fn read_topics(
            &self,
            a: u64,
            u: u64,
            t: &[String],
            l: usize,
        ) -> Result<Vec<Record>, LogError> {
            self.inner.read_topics(a, u, t, l)
        }
        fn read_channel(&self, c: &str, a: u64, u: u64, l: usize) -> Result<Vec<Record>, LogError> {
            self.inner.read_channel(c, a, u, l)
        }
        fn read_channel_back(&self, c: &str, b: u64, l: usize) -> Result<Vec<Record>, LogError> {
            self.inner.read_channel_back(c, b, l)
        }
        fn find_id(&self, id: &str) -> Result<Option<u64>, LogError> {
            self.inner.find_id(id)
        }
        fn last(&self) -> Result<Option<Record>, LogError> {
            self.inner.last()
        }
        fn channel_first_seq(&self, c: &str) -> Result<Option<u64>, LogError> {
            self.inner.channel_first_seq(c)
        }
        fn channel_top(&self, c: &str, u: u64) -> Result<Option<u64>, LogError> {
            self.inner.channel_top(c, u)
        }
        fn channel_pruned_upto(&self, c: &str) -> Result<u64, LogError> {
            self.inner.channel_pruned_upto(c)
        }
        fn prune_step(
            &self,
            r: &Retention,
            now: i64,
            after: &str,
            max: usize,
        ) -> Result<(u64, Option<String>), LogError> {
            self.inner.prune_step(r, now, after, max)
        }
        fn trim_channel(&self, c: &str, upto: u64) -> Result<u64, LogError> {
            self.inner.trim_channel(c, upto)
        }
        fn channels(&self, p: &str, a: &str, l: usize) -> Result<Vec<String>, LogError> {
            self.inner.channels(p, a, l)
        }
        fn epoch(&self) -> String {
            self.inner.epoch()
        }
        fn flush(&self) -> Result<(), LogError> {
            self.inner.flush()
        }
    }

    fn gated() -> Arc<Gated> {
        Arc::new(Gated {
            inner: MemoryLog::new(),
            started: AtomicUsize::new(0),
            gate: parking_lot::Condvar::new(),
            open: Mutex::new(false),
            fail: AtomicBool::new(false),
        })
    }

    fn rec() -> Record {
        Record {
            topics: vec!["t".into()],
            ..Default::default()
        }
    }

    /// A storm of reads stuck in the store neither delays appends (the writer has its own thread) nor takes
    /// more than MAX_READS places on the blocking pool.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stuck_reads_do_not_delay_appends_and_are_capped() {
        let log = gated();
        let engine = Arc::new(LocalEngine::new(
            log.clone(),
            Retention::default(),
            Duration::from_secs(60),
        ));
        let mut reads = Vec::new();
        for _ in 0..MAX_READS * 3 {
            let e = engine.clone();
            reads.push(tokio::spawn(async move {
                e.read_range(0, u64::MAX, 10, None).await
            }));
        }
        // Wait (bounded) until the cap is reached: that many reads are inside the store.
        for _ in 0..500 {
            if log.started.load(Ordering::SeqCst) >= MAX_READS {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(log.started.load(Ordering::SeqCst), MAX_READS);
        let appended = tokio::time::timeout(Duration::from_secs(10), engine.append(vec![rec()]))
            .await
            .expect("an append completes while every read is stuck")
            .unwrap();
        assert!(appended[0].seq > 0);
        assert_eq!(
            log.started.load(Ordering::SeqCst),
            MAX_READS,
            "no read beyond the cap started"
        );
        *log.open.lock() = true;
        log.gate.notify_all();
        for r in reads {
            assert_eq!(r.await.unwrap().unwrap().len(), 1);
        }
    }

    #[tokio::test]
    async fn health_follows_the_last_write() {
        let log = gated();
        *log.open.lock() = true;
        let engine = LocalEngine::new(log.clone(), Retention::default(), Duration::from_secs(60));
        assert!(engine.health().await.is_ok());
        log.fail.store(true, Ordering::SeqCst);
        assert!(engine.append(vec![rec()]).await.is_err());
        let e = engine.health().await.unwrap_err().to_string();
        assert!(e.contains("disk full"), "{e}");
        log.fail.store(false, Ordering::SeqCst);
        engine.append(vec![rec()]).await.unwrap();
        assert!(engine.health().await.is_ok());
        engine.close().await.unwrap();
        assert!(
            engine.health().await.is_err(),
            "a closed writer is not healthy"
        );
    }
}
