//! The scheduler: `concurrency` workers take parts in order (blob by blob) from one shared queue,
//! so at most that many ranged GETs are in flight across all blobs, over pooled connections.
use std::mem;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::JoinSet;

use crate::client::HttpClient;
use crate::error::{Cause, Failure};
use crate::part::fetch_part;
use crate::spec::{Job, Options};

/// What every worker shares: the client, the limits, and the counters Python polls.
pub struct Shared {
    pub client: HttpClient,
    pub options: Options,
    bytes: AtomicU64,
    retries: AtomicU64,
    parts: AtomicU64,
    done: Mutex<Vec<(usize, usize)>>,
}

/// Counters read by Python at each progress tick.
pub struct Tick {
    pub bytes: u64,
    pub done: Vec<(usize, usize)>,
}

pub struct Totals {
    pub bytes: u64,
    pub retries: u64,
    pub parts: u64,
}

impl Shared {
    pub fn new(client: HttpClient, options: Options) -> Self {
        Shared {
            client,
            options,
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            parts: AtomicU64::new(0),
            done: Mutex::new(Vec::new()),
        }
    }

    pub fn count_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    fn part_done(&self, job_index: usize, part_index: usize) {
        self.parts.fetch_add(1, Ordering::Relaxed);
        self.done_list().push((job_index, part_index));
    }

    /// Bytes written in total so far, and the parts finished since the last call.
    pub fn take_tick(&self) -> Tick {
        Tick {
            bytes: self.bytes.load(Ordering::Relaxed),
            done: mem::take(&mut *self.done_list()),
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            bytes: self.bytes.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            parts: self.parts.load(Ordering::Relaxed),
        }
    }

    fn done_list(&self) -> std::sync::MutexGuard<'_, Vec<(usize, usize)>> {
        // A worker never panics while holding the lock, and the list stays valid even if one did.
        self.done
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Fetches every part of every job; on the first failure the other workers are cancelled
/// (their requests dropped) and that failure is returned.
pub async fn run(shared: Arc<Shared>, jobs: Arc<Vec<Job>>) -> Result<(), Box<Failure>> {
    let queue: Arc<Vec<(usize, usize)>> = Arc::new(
        jobs.iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.parts.len()).map(move |p| (j, p)))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..shared.options.concurrency.min(queue.len()) {
        let (shared, jobs, queue, next) =
            (shared.clone(), jobs.clone(), queue.clone(), next.clone());
        workers.spawn(async move { worker(&shared, &jobs, &queue, &next).await });
    }
    while let Some(joined) = workers.join_next().await {
        let outcome = joined.unwrap_or_else(|e| Err(panicked(&jobs, e)));
        if let Err(failure) = outcome {
            workers.abort_all();
            return Err(failure);
        }
    }
    Ok(())
}

async fn worker(
    shared: &Shared,
    jobs: &[Job],
    queue: &[(usize, usize)],
    next: &AtomicUsize,
) -> Result<(), Box<Failure>> {
    while let Some(&(j, p)) = queue.get(next.fetch_add(1, Ordering::Relaxed)) {
        let (job, part) = (&jobs[j], &jobs[j].parts[p]);
        fetch_part(shared, j, job, part).await?;
        shared.part_done(j, part.index);
    }
    Ok(())
}

/// A worker panic (a bug) still ends as a FetchError rather than a hang or an abort.
fn panicked(jobs: &[Job], err: tokio::task::JoinError) -> Box<Failure> {
    let job = &jobs[0];
    Box::new(Failure {
        cause: Cause::Transport(format!("internal error in a transfer worker: {err}")),
        path: job.path.clone(),
        offset: 0,
        length: job.size,
        job_index: 0,
        part_index: 0,
        url: job.shown_url.clone(),
        attempts: 1,
    })
}
