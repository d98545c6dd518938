//! Group commit for the decision log.
//!
//! Every reconcile must have its records on disk before it changes anything, and an fsync
//! costs milliseconds. Reconciles therefore hand their records to one writer thread, which
//! appends everything that is waiting in one write and one fsync, then answers each reconcile.
//! A record is still acknowledged only once it is durable; concurrent reconciles just share the
//! fsync.

use std::sync::{Arc, mpsc};
use std::thread;

use tokio::sync::oneshot;

use crate::audit::{AuditError, AuditLog, Entry};

type Reply = oneshot::Sender<Result<(), JournalError>>;

/// Why records could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// The append failed (shared by every reconcile whose records were in that batch).
    #[error("{0}")]
    Append(Arc<AuditError>),
    #[error("the decision log writer has stopped")]
    Stopped,
}

/// A handle to the writer thread. Cloning it is cheap; the thread stops when every handle is
/// dropped.
#[derive(Clone)]
pub(crate) struct Journal {
    requests: mpsc::Sender<(Vec<Entry>, Reply)>,
}

impl Journal {
    /// Starts the writer thread that owns `log`.
    pub(crate) fn start(mut log: AuditLog) -> std::io::Result<Journal> {
        let (requests, queue) = mpsc::channel::<(Vec<Entry>, Reply)>();
        thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || {
                while let Ok(first) = queue.recv() {
                    let mut batch = vec![first];
                    batch.extend(queue.try_iter());
                    let entries: Vec<Entry> =
                        batch.iter().flat_map(|(e, _)| e.iter().cloned()).collect();
                    let result = log
                        .append(&entries, chrono::Utc::now())
                        .map(|_| ())
                        .map_err(|e| JournalError::Append(Arc::new(e)));
                    for (_, reply) in batch {
                        let _ = reply.send(result.clone());
                    }
                }
            })?;
        Ok(Journal { requests })
    }

    /// Appends `entries` and returns once they are on disk.
    pub(crate) async fn record(&self, entries: Vec<Entry>) -> Result<(), JournalError> {
        if entries.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.requests
            .send((entries, reply))
            .map_err(|_| JournalError::Stopped)?;
        answer.await.map_err(|_| JournalError::Stopped)?
    }
}
