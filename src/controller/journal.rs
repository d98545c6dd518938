//! Group commit for the decision log, and what happens while it cannot be written.
//!
//! Every reconcile must have its records on disk before it changes anything, and an fsync
//! costs milliseconds. Reconciles therefore hand their records to one writer thread, which
//! appends everything that is waiting in one write and one fsync, then answers each reconcile.
//! A record is still acknowledged only once it is durable; concurrent reconciles just share the
//! fsync.
//!
//! # When the log cannot be written
//!
//! A full disk or an I/O error must not take credentials down, nor may anything new be granted
//! without its record. So records come in two kinds:
//!
//! - **Gates** ([`Journal::record`]): grants, applies, issues, policy and role writes. The change
//!   waits for the record; when the append fails, the change is not made.
//! - **Keep-alives** ([`Journal::record_keepalive`]): renewing a lease already granted, revoking
//!   one, a failed Vault call. These only keep what was granted alive or take access away, so
//!   when the append fails they go ahead: their records are held in memory (up to
//!   [`MAX_DEFERRED`]) and appended, marked as recorded late, as soon as the log can be written
//!   again. Held records are lost if the operator dies before then; the count is in
//!   `portcullis_decision_log_deferred_records`.
//!
//! While appends fail, `/readyz` answers 503 naming the error, `portcullis_decision_log_writable`
//! is 0, and every pipeline that waits on a gate shows `Ready=False`, `Degraded=True` with reason
//! `DecisionLogUnavailable`. The writer retries the held records every few seconds, and every
//! new append is a retry too.

use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::{error, info};

use super::metrics::Metrics;
use crate::audit::{AuditError, AuditLog, Entry};

type Reply = oneshot::Sender<Result<(), JournalError>>;

/// The most keep-alive records held while the log cannot be written; beyond it, the oldest are
/// dropped (and counted in the message of the first record appended afterwards).
pub(crate) const MAX_DEFERRED: usize = 10_000;

/// How often held records are retried while nothing else is appended.
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// Why records could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// The append failed (shared by every reconcile whose records were in that batch).
    #[error("{0}")]
    Append(Arc<AuditError>),
    #[error("the decision log writer has stopped")]
    Stopped,
}

/// Whether the log can be written, for `/readyz`.
#[derive(Debug, Default)]
pub(crate) struct LogHealth {
    /// The error of the last append, while appends fail.
    failing: Mutex<Option<String>>,
}

impl LogHealth {
    /// The error of the last append, while appends fail.
    pub(crate) fn failing(&self) -> Option<String> {
        self.failing.lock().expect("log health lock").clone()
    }

    fn set(&self, error: Option<String>) {
        *self.failing.lock().expect("log health lock") = error;
    }
}

struct Request {
    entries: Vec<Entry>,
    reply: Reply,
    keepalive: bool,
}

/// A handle to the writer thread. Cloning it is cheap; the thread stops when every handle is
/// dropped.
#[derive(Clone)]
pub(crate) struct Journal {
    requests: mpsc::Sender<Request>,
}

impl Journal {
    /// Starts the writer thread that owns `log`.
    pub(crate) fn start(
        log: AuditLog,
        health: Arc<LogHealth>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Journal> {
        let (requests, queue) = mpsc::channel::<Request>();
        thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || Writer::new(log, health, metrics).run(&queue))?;
        Ok(Journal { requests })
    }

    /// Appends `entries` and returns once they are on disk: a gate. Make the change only when
    /// this returns `Ok`.
    pub(crate) async fn record(&self, entries: Vec<Entry>) -> Result<(), JournalError> {
        self.send(entries, false).await
    }

    /// Appends `entries` of a renewal, revocation or failure; when the log cannot be written,
    /// holds them to append later and returns `Ok`, so the change goes ahead.
    pub(crate) async fn record_keepalive(&self, entries: Vec<Entry>) -> Result<(), JournalError> {
        self.send(entries, true).await
    }

    async fn send(&self, entries: Vec<Entry>, keepalive: bool) -> Result<(), JournalError> {
        if entries.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request {
                entries,
                reply,
                keepalive,
            })
            .map_err(|_| JournalError::Stopped)?;
        answer.await.map_err(|_| JournalError::Stopped)?
    }
}

/// The writer thread's state.
struct Writer {
    log: AuditLog,
    health: Arc<LogHealth>,
    metrics: Arc<Metrics>,
    /// Keep-alive records whose append failed, oldest first.
    deferred: Vec<Entry>,
    /// Keep-alive records dropped because [`MAX_DEFERRED`] were held.
    dropped: u64,
}

impl Writer {
    fn new(log: AuditLog, health: Arc<LogHealth>, metrics: Arc<Metrics>) -> Writer {
        Writer {
            log,
            health,
            metrics,
            deferred: Vec::new(),
            dropped: 0,
        }
    }

    fn run(mut self, queue: &mpsc::Receiver<Request>) {
        loop {
            let first = if self.deferred.is_empty() {
                match queue.recv() {
                    Ok(r) => Some(r),
                    Err(_) => return,
                }
            } else {
                match queue.recv_timeout(RETRY_EVERY) {
                    Ok(r) => Some(r),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            };
            let batch: Vec<Request> = first.into_iter().chain(queue.try_iter()).collect();
            self.write(batch);
        }
    }

    /// Appends the held records and the batch in one append, and answers the batch.
    fn write(&mut self, batch: Vec<Request>) {
        let now = chrono::Utc::now();
        let held = self.deferred.len();
        let mut entries = std::mem::take(&mut self.deferred);
        if self.dropped > 0
            && let Some(first) = entries.first_mut()
        {
            first.message = format!(
                "{} [{} earlier records of renewals and revocations were lost: the log could not be written and more than {MAX_DEFERRED} were waiting]",
                first.message, self.dropped
            );
        }
        entries.extend(batch.iter().flat_map(|r| r.entries.iter().cloned()));
        match self.log.append(&entries, now) {
            Ok(_) => {
                if held > 0 || self.health.failing().is_some() {
                    info!(
                        appended_late = held,
                        "the decision log can be written again"
                    );
                }
                self.dropped = 0;
                self.health.set(None);
                self.metrics.decision_log_writable.set(1);
                self.metrics.decision_log_deferred.set(0);
                for r in batch {
                    let _ = r.reply.send(Ok(()));
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                error!(error = %e, held, "the decision log cannot be written: nothing new is granted until it can; renewals and revocations go ahead and their records are held");
                self.health.set(Some(e.to_string()));
                self.metrics.decision_log_write_failures.inc();
                self.metrics.decision_log_writable.set(0);
                // What was held stays held, first.
                self.deferred = entries;
                self.deferred.truncate(held);
                for r in batch {
                    if r.keepalive {
                        let when = crate::audit::format_time(now);
                        self.deferred.extend(r.entries.into_iter().map(|mut entry| {
                            entry.message = format!(
                                "{} [recorded late: the decision log could not be written at {when}]",
                                entry.message
                            );
                            entry
                        }));
                        let _ = r.reply.send(Ok(()));
                    } else {
                        let _ = r.reply.send(Err(JournalError::Append(e.clone())));
                    }
                }
                if self.deferred.len() > MAX_DEFERRED {
                    let excess = self.deferred.len() - MAX_DEFERRED;
                    self.deferred.drain(..excess);
                    self.dropped += excess as u64;
                }
                #[allow(clippy::cast_possible_wrap, reason = "at most MAX_DEFERRED")]
                self.metrics
                    .decision_log_deferred
                    .set(self.deferred.len() as i64);
            }
        }
    }
}
