//! The audit writer: appends audit rows off the request path, in order, batching what
//! queues up under load into one transaction per batch.
//!
//! Read-your-writes holds within a server: [`AuditWriter::flush`] waits until everything
//! queued before it is stored, and the audit API flushes before it reads. A clean shutdown
//! flushes too; a crash can lose the rows of requests answered in the last moments (the
//! queue is in memory), which is the price of keeping the write off every mutating call.

use kiln_store::{AuditRow, Store};
use tokio::sync::{mpsc, oneshot};

enum Job {
    Row(Box<AuditRow>),
    Flush(oneshot::Sender<()>),
}

/// Handle to the writer task.
pub struct AuditWriter {
    tx: mpsc::UnboundedSender<Job>,
}

impl AuditWriter {
    /// Starts the writer on the current runtime; it ends when the last handle is dropped.
    pub fn start(store: Store) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while let Some(job) = rx.recv().await {
                let mut waiters = Vec::new();
                let mut push = |j: Job, batch: &mut Vec<AuditRow>| match j {
                    Job::Row(r) => batch.push(*r),
                    Job::Flush(w) => waiters.push(w),
                };
                push(job, &mut batch);
                while batch.len() < 256 {
                    match rx.try_recv() {
                        Ok(j) => push(j, &mut batch),
                        Err(_) => break,
                    }
                }
                if !batch.is_empty() {
                    if let Err(e) = store.append_audit_batch(&batch).await {
                        tracing::error!(error = %e, rows = batch.len(), "audit: cannot append");
                    }
                    batch.clear();
                }
                for w in waiters {
                    let _ = w.send(());
                }
            }
        });
        Self { tx }
    }

    /// Queues a row.
    pub fn append(&self, row: AuditRow) {
        if self.tx.send(Job::Row(Box::new(row))).is_err() {
            tracing::error!("audit: writer stopped; an entry was dropped");
        }
    }

    /// Waits until every row queued before this call is stored.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Job::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}
