//! Batching of concurrent requests: what group commit does for appends, and the stream
//! reader and the send gate's reader for loads. Callers hand jobs to a channel; a few
//! worker tasks each take whatever jobs are waiting and handle them together (one
//! statement, one round trip).
//! Under load that turns N round trips into one; with a single caller the batch is that
//! one job, and the cost is one channel hop.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};

/// Hands the job `job(reply)` to the workers behind `jobs` and waits for what they send
/// on `reply`; `None` when the workers have stopped (the job was not taken, or dropped
/// unanswered).
pub async fn ask<J, T>(
    jobs: &mpsc::Sender<J>,
    job: impl FnOnce(oneshot::Sender<T>) -> J,
) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    jobs.send(job(reply)).await.ok()?;
    answer.await.ok()
}

/// A channel for jobs of type `J`, and `workers` tasks that each take up to `max`
/// waiting jobs at a time and hand them to `handle` as one batch (several batches are
/// handled at once, one per worker). The tasks end when every sender is dropped. Must be
/// called inside a tokio runtime.
pub fn spawn<J, F, Fut>(workers: usize, max: usize, handle: F) -> mpsc::Sender<J>
where
    J: Send + 'static,
    F: Fn(Vec<J>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let (jobs, rx) = mpsc::channel::<J>(max * workers * 2);
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..workers {
        let (rx, handle) = (rx.clone(), handle.clone());
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(max);
            loop {
                {
                    // One worker at a time gathers: it waits for the first job, then
                    // takes whatever else is already queued.
                    let mut rx = rx.lock().await;
                    if rx.recv_many(&mut batch, max).await == 0 {
                        return;
                    }
                    if batch.len() < max {
                        // Let the tasks that are about to hand in a job do so first (no
                        // timer: one turn of the scheduler).
                        tokio::task::yield_now().await;
                        while batch.len() < max {
                            match rx.try_recv() {
                                Ok(job) => batch.push(job),
                                Err(_) => break,
                            }
                        }
                    }
                }
                handle(std::mem::take(&mut batch)).await;
            }
        });
    }
    jobs
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn every_job_is_answered_and_waiting_jobs_share_a_batch() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counted = batches.clone();
        let jobs = spawn(2, 64, move |batch: Vec<(u32, oneshot::Sender<u32>)>| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, Ordering::Relaxed);
                for (n, reply) in batch {
                    let _ = reply.send(n * 2);
                }
            }
        });
        let mut answers = Vec::new();
        for n in 0..200u32 {
            let (tx, rx) = oneshot::channel();
            jobs.send((n, tx)).await.unwrap();
            answers.push((n, rx));
        }
        for (n, rx) in answers {
            assert_eq!(rx.await.unwrap(), n * 2);
        }
        // 200 jobs queued before any was handled: batches of up to 64, not 200 of one.
        assert!(batches.load(Ordering::Relaxed) <= 8, "{batches:?}");
    }
}
