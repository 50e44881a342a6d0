//! Group commit, the same for every store: batches are numbered in the order they are
//! submitted and queued to one writer thread; every batch that arrives while it is busy joins
//! its next transaction, so one durable commit (an fsync) serves many callers. The first failed
//! commit stops it for good: that batch, every batch queued behind it and every later one fail,
//! for each is a delta on top of state the failed one would have made.
//!
//! Batches of a cluster replica carry a [`Fence`]: the namespace lease they are written under.
//! A failed group then stops only what it touched: every later batch under one of its fences
//! fails (it builds on the writes that failed), while other namespaces, and the same namespace
//! under a new lease (its engine reopened from what is durable), go on.

use super::api::{Commit, Durability, Fence, OnDurable, StoreError, WriteBatch};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};

/// A batch with its number, the lease it is written under, and where its outcome goes.
pub(super) struct Job {
    pub(super) seq: u64,
    pub(super) batch: WriteBatch,
    pub(super) fence: Option<Fence>,
    on_durable: Option<OnDurable>,
    reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Counters of the writer, to see group commit at work.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed.
    pub transactions: AtomicU64,
    /// Batches made durable by them.
    pub batches: AtomicU64,
}

/// The writer thread and the queue in front of it.
pub(super) struct GroupCommit {
    stats: Arc<WriterStats>,
    /// The writer's channel and the number of the last batch sent into it (one lock, so that
    /// numbers follow the order batches reach the writer).
    sender: Mutex<(Option<mpsc::Sender<Job>>, u64)>,
    durability: tokio::sync::watch::Receiver<Durability>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl GroupCommit {
    /// Starts the writer thread; `commit` makes a group of batches durable in one transaction,
    /// in order, or fails them all.
    pub(super) fn start(
        name: &str,
        commit: impl FnMut(&[Job]) -> Result<(), StoreError> + Send + 'static,
    ) -> std::io::Result<GroupCommit> {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(WriterStats::default());
        let writer_stats = stats.clone();
        let (durable_tx, durability) = tokio::sync::watch::channel(Durability::default());
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || writer_loop(rx, &writer_stats, durable_tx, commit))?;
        Ok(GroupCommit {
            stats,
            sender: Mutex::new((Some(tx), 0)),
            durability,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Queues a batch, written under `fence` if it has one (see the module's comment); once it
    /// is durable `on_durable` runs on the writer thread, then its `done` resolves; or `done`
    /// says why it never will be.
    pub(super) fn submit(
        &self,
        batch: WriteBatch,
        fence: Option<Fence>,
        on_durable: Option<OnDurable>,
    ) -> Commit {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut sender = self.sender.lock();
        sender.1 += 1;
        let seq = sender.1;
        if let Some(why) = &self.durability.borrow().failed {
            let _ = tx.send(Err(format!(
                "not written: an earlier commit failed ({why})"
            )));
            return Commit { seq, done: rx };
        }
        match sender.0.as_ref() {
            Some(s) => {
                let job = Job {
                    seq,
                    batch,
                    fence,
                    on_durable,
                    reply: tx,
                };
                if let Err(mpsc::SendError(job)) = s.send(job) {
                    let _ = job.reply.send(Err(StoreError::WriterGone.to_string()));
                }
            }
            None => {
                let _ = tx.send(Err(StoreError::WriterGone.to_string()));
            }
        }
        Commit { seq, done: rx }
    }

    /// How far commits have got.
    pub(super) fn durability(&self) -> tokio::sync::watch::Receiver<Durability> {
        self.durability.clone()
    }

    /// (transactions, batches) committed so far.
    pub(super) fn stats(&self) -> (u64, u64) {
        (
            self.stats.transactions.load(Relaxed),
            self.stats.batches.load(Relaxed),
        )
    }

    /// Stops the writer after it has committed everything already submitted.
    pub(super) fn close(&self) {
        self.sender.lock().0.take();
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
    }
}

fn writer_loop(
    rx: mpsc::Receiver<Job>,
    stats: &WriterStats,
    durable: tokio::sync::watch::Sender<Durability>,
    mut commit: impl FnMut(&[Job]) -> Result<(), StoreError>,
) {
    // Bounded so one transaction never grows without limit under a flood of requests.
    const MAX_JOBS_PER_COMMIT: usize = 2048;
    let mut failed: Option<Arc<str>> = None;
    // Leases under which a commit failed: what comes after under them must fail too.
    let mut failed_fences: HashSet<Fence> = HashSet::new();
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_JOBS_PER_COMMIT {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if let Some(why) = &failed {
            // Every batch after a failed one builds on state that was never written: none of
            // them may land, or a restart would find a history with holes.
            for job in jobs {
                let _ = job.reply.send(Err(format!(
                    "not written: an earlier commit failed ({why})"
                )));
            }
            continue;
        }
        let last_seq = jobs.last().map(|job| job.seq).unwrap_or(0);
        if !failed_fences.is_empty() {
            let (refused, kept): (Vec<Job>, Vec<Job>) = jobs.into_iter().partition(|job| {
                job.fence
                    .as_ref()
                    .is_some_and(|f| failed_fences.contains(f))
            });
            for job in refused {
                let fence = job.fence.as_ref().expect("partitioned on it");
                let _ = job.reply.send(Err(format!(
                    "not written: an earlier commit in namespace {} under lease epoch {} failed",
                    fence.namespace, fence.epoch
                )));
            }
            jobs = kept;
            if jobs.is_empty() {
                durable.send_modify(|d| d.seq = d.seq.max(last_seq));
                continue;
            }
        }
        let started = std::time::Instant::now();
        let outcome = commit(&jobs).map_err(|e| e.to_string());
        let all_fenced = jobs.iter().all(|job| job.fence.is_some());
        if outcome.is_ok() {
            durable.send_modify(|d| d.seq = last_seq);
            stats.transactions.fetch_add(1, Relaxed);
            stats.batches.fetch_add(jobs.len() as u64, Relaxed);
            // No-ops unless a metrics recorder is installed.
            metrics::counter!("tether_store_commits_total").increment(1);
            metrics::counter!("tether_store_batches_total").increment(jobs.len() as u64);
            metrics::histogram!("tether_store_commit_seconds")
                .record(started.elapsed().as_secs_f64());
        } else {
            metrics::counter!("tether_store_commit_failures_total").increment(1);
        }
        match &outcome {
            Err(e) if all_fenced => {
                // Only the namespaces in this group are stopped; their engines reopen from
                // what is durable. The numbering moves on: every batch up to here is durable
                // or has been told it never will be.
                tracing::warn!(error = %e, batches = jobs.len(), "a fenced commit failed; its namespaces take no more writes under their current leases");
                failed_fences.extend(jobs.iter().filter_map(|job| job.fence.clone()));
                durable.send_modify(|d| d.seq = d.seq.max(last_seq));
            }
            Err(e) => {
                tracing::error!(error = %e, batches = jobs.len(), "commit failed; the store accepts no more writes");
                let why: Arc<str> = e.as_str().into();
                durable.send_modify(|d| d.failed = Some(why.clone()));
                failed = Some(why);
            }
            Ok(()) => {}
        }
        for job in jobs {
            if let (Ok(()), Some(on_durable)) = (&outcome, job.on_durable) {
                // A panic there must not take the writer, and every later commit, with it.
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(on_durable)).is_err() {
                    tracing::error!(
                        seq = job.seq,
                        "what was to follow a durable commit panicked; the commit stands"
                    );
                }
            }
            let _ = job.reply.send(outcome.clone());
        }
    }
}
