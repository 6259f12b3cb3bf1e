//! Group commit for a hot write path: writes that arrive together run in one transaction, so
//! they share one commit (one WAL flush) and, when they touch the same row (a much-ordered
//! product), take its lock once a batch instead of queuing on it one commit after another.
//! `synchronous_commit` stays on: a caller hears of its write only after the batch committed.
//!
//! Each write must be a unit by itself inside the shared transaction: it either does all of
//! its work or none (one statement that changes nothing when it refuses, say), because the
//! batch commits whatever its writes did. A write that fails with a database error (a lost
//! connection, a deadlock, a constraint) aborts the transaction; the batch is rolled back and
//! each of its writes runs again alone, committed on its own, so one bad write costs the
//! others a retry, never their outcome.
//!
//! Writers: several run in parallel, a write going to the writer of its first lock key (one hot
//! row's writes queue in this process, not on the row's lock). A batch takes the oldest waiting
//! write, then others only while their first key is no lower than the highest key the batch
//! already holds: each transaction takes its row locks in ascending key order, as every other
//! transaction of the caller's must, so batches cannot deadlock, and the oldest write always
//! goes next, so none waits forever. Our own batcher: sqlx has no pipelining or group commit.
//!
//! A write may also say how to do a whole batch at once ([`BatchWrite::write_together`]): a few
//! statements for the batch instead of one a write, each a round trip.

use std::collections::VecDeque;
use std::sync::Arc;

use sqlx::PgConnection;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::Pg;
use crate::server::BoxFuture;

/// One write of a batch.
pub trait BatchWrite: Send + Sync + 'static {
    type Output: Send + 'static;

    /// The lowest and highest row it locks, in the lock order every transaction keeps (by
    /// primary key); `None` for a write that locks no row another write could.
    fn lock_keys(&self) -> Option<(Uuid, Uuid)>;

    /// Does the write on `conn` (inside the batch's transaction, or alone). A database error
    /// aborts the batch; anything else (a refusal) is the write's outcome.
    fn write<'c>(
        &'c self,
        conn: &'c mut PgConnection,
    ) -> BoxFuture<'c, Result<Self::Output, sqlx::Error>>;

    /// Does every write of a batch (at least two, in the batch's order) inside its
    /// transaction, with the same outcomes as one after another in that order. The default
    /// has no such form and answers [`Together::OneAfterAnother`] without touching `conn`.
    fn write_together<'c>(
        writes: &'c [&'c Self],
        conn: &'c mut PgConnection,
    ) -> BoxFuture<'c, Result<Together<Self::Output>, sqlx::Error>>
    where
        Self: Sized,
    {
        let _ = (writes, conn);
        Box::pin(async { Ok(Together::OneAfterAnother) })
    }
}

/// What [`BatchWrite::write_together`] did.
#[derive(Debug)]
pub enum Together<O> {
    /// Every write's outcome, in the batch's order: the batch commits.
    Written(Vec<O>),
    /// Nothing done: run the writes one after another in the same transaction.
    OneAfterAnother,
    /// The outcomes would depend on a race (a write met a concurrent transaction's row): roll
    /// the batch back and run each write alone.
    EachAlone,
}

/// Most writes in one transaction.
const MOST_PER_BATCH: usize = 64;

/// Hands writes to the writer tasks; cloned freely, the writers end when the last clone goes.
pub struct Batcher<W: BatchWrite> {
    writers: Arc<Vec<mpsc::Sender<Waiting<W>>>>,
}

impl<W: BatchWrite> Clone for Batcher<W> {
    fn clone(&self) -> Self {
        Batcher {
            writers: self.writers.clone(),
        }
    }
}

impl<W: BatchWrite> std::fmt::Debug for Batcher<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("writers", &self.writers.len())
            .finish()
    }
}

struct Waiting<W: BatchWrite> {
    write: W,
    answer: oneshot::Sender<Result<W::Output, sqlx::Error>>,
}

impl<W: BatchWrite> Batcher<W> {
    /// Starts `writers` writer tasks (1 to 8) on the current runtime.
    pub fn start(pg: &Pg, writers: usize) -> Batcher<W> {
        let writers = (0..writers.clamp(1, 8))
            .map(|_| {
                let (send, receive) = mpsc::channel(1024);
                tokio::spawn(write_batches(pg.clone(), receive));
                send
            })
            .collect();
        Batcher {
            writers: Arc::new(writers),
        }
    }

    /// Runs `write` in the next batch of its writer; returns once that batch committed (or the
    /// write, retried alone, did).
    pub async fn write(&self, write: W) -> Result<W::Output, sqlx::Error> {
        let first = write.lock_keys().map_or(0, |(first, _)| first.as_u128());
        let writers = u128::try_from(self.writers.len()).unwrap_or(1).max(1);
        let index = usize::try_from(first % writers).unwrap_or(0);
        let (answer, answered) = oneshot::channel();
        // The writers run as long as a sender: a closed channel is a store shutting down.
        self.writers[index]
            .send(Waiting { write, answer })
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        answered.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

/// One writer: batches what arrived meanwhile, until every sender is gone.
async fn write_batches<W: BatchWrite>(pg: Pg, mut arrivals: mpsc::Receiver<Waiting<W>>) {
    let mut waiting: VecDeque<Waiting<W>> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match arrivals.recv().await {
                Some(w) => waiting.push_back(w),
                None => return,
            }
        }
        while waiting.len() < MOST_PER_BATCH * 4 {
            match arrivals.try_recv() {
                Ok(w) => waiting.push_back(w),
                Err(_) => break,
            }
        }
        let batch = next_batch(&mut waiting);
        run_batch(&pg, batch).await;
    }
}

/// The oldest waiting write, then others in ascending first key while that is no lower than
/// the highest key taken so far; the rest keep waiting, in arrival order.
fn next_batch<W: BatchWrite>(waiting: &mut VecDeque<Waiting<W>>) -> Vec<Waiting<W>> {
    let Some(oldest) = waiting.pop_front() else {
        return Vec::new();
    };
    let mut highest = oldest.write.lock_keys().map(|(_, last)| last);
    let mut batch = vec![oldest];
    let mut others: Vec<Waiting<W>> = waiting.drain(..).collect();
    others.sort_by_key(|w| w.write.lock_keys().map(|(first, _)| first));
    let mut left = Vec::new();
    for w in others {
        let fits = match (w.write.lock_keys(), highest) {
            (None, _) | (_, None) => true,
            (Some((first, _)), Some(high)) => first >= high,
        };
        if batch.len() < MOST_PER_BATCH && fits {
            if let Some((_, last)) = w.write.lock_keys() {
                highest = Some(highest.map_or(last, |h| h.max(last)));
            }
            batch.push(w);
        } else {
            left.push(w);
        }
    }
    // Back in arrival order is not needed for fairness (the oldest always goes first), only
    // kept stable.
    waiting.extend(left);
    batch
}

async fn run_batch<W: BatchWrite>(pg: &Pg, batch: Vec<Waiting<W>>) {
    if batch.len() > 1 {
        let together = async {
            let mut tx = pg.pool().begin().await?;
            let writes: Vec<&W> = batch.iter().map(|w| &w.write).collect();
            let outputs = match W::write_together(&writes, &mut tx).await? {
                Together::Written(outputs) if outputs.len() == batch.len() => outputs,
                // A wrong count is a bug in the write; nothing it did is kept.
                Together::Written(_) | Together::EachAlone => return Ok(None),
                Together::OneAfterAnother => {
                    let mut outputs = Vec::with_capacity(batch.len());
                    for w in &batch {
                        outputs.push(w.write.write(&mut tx).await?);
                    }
                    outputs
                }
            };
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Some(outputs))
        };
        match together.await {
            Ok(None) => {
                tracing::debug!(
                    writes = batch.len(),
                    "a batch's outcome met a race; each write runs again alone"
                );
            }
            Ok(Some(outputs)) => {
                for (w, output) in batch.into_iter().zip(outputs) {
                    // The caller may be gone (its request was cancelled): nothing to tell.
                    let _ = w.answer.send(Ok(output));
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, writes = batch.len(), "a batch of writes failed; each runs again alone");
            }
        }
    }
    for w in batch {
        let output = match pg.pool().acquire().await {
            Ok(mut conn) => w.write.write(&mut conn).await,
            Err(e) => Err(e),
        };
        let _ = w.answer.send(output);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Locks(Option<(u128, u128)>);

    impl BatchWrite for Locks {
        type Output = ();
        fn lock_keys(&self) -> Option<(Uuid, Uuid)> {
            self.0
                .map(|(a, b)| (Uuid::from_u128(a), Uuid::from_u128(b)))
        }
        fn write<'c>(&'c self, _: &'c mut PgConnection) -> BoxFuture<'c, Result<(), sqlx::Error>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn waiting(locks: &[Option<(u128, u128)>]) -> VecDeque<Waiting<Locks>> {
        locks
            .iter()
            .map(|l| Waiting {
                write: Locks(*l),
                answer: oneshot::channel().0,
            })
            .collect()
    }

    fn keys(batch: &[Waiting<Locks>]) -> Vec<Option<(u128, u128)>> {
        batch.iter().map(|w| w.write.0).collect()
    }

    #[test]
    fn a_batch_locks_in_ascending_order_and_starts_with_the_oldest() {
        // Oldest locks 5..9: 3..4 cannot follow it (it would lock below 9), 9..9 and 12..20 can.
        let mut queue = waiting(&[Some((5, 9)), Some((3, 4)), Some((12, 20)), Some((9, 9))]);
        let batch = next_batch(&mut queue);
        assert_eq!(
            keys(&batch),
            vec![Some((5, 9)), Some((9, 9)), Some((12, 20))]
        );
        assert_eq!(
            queue.iter().map(|w| w.write.0).collect::<Vec<_>>(),
            vec![Some((3, 4))]
        );
        // Next time the one left behind goes first.
        assert_eq!(keys(&next_batch(&mut queue)), vec![Some((3, 4))]);
        assert!(queue.is_empty());
    }

    #[test]
    fn one_hot_row_batches_whole_and_writes_locking_nothing_always_fit() {
        let mut queue = waiting(&[Some((7, 7)), None, Some((7, 7)), Some((7, 7))]);
        assert_eq!(next_batch(&mut queue).len(), 4);
        let mut many = waiting(&vec![Some((1, 1)); 100]);
        assert_eq!(next_batch(&mut many).len(), MOST_PER_BATCH);
        assert_eq!(many.len(), 100 - MOST_PER_BATCH);
    }
}
