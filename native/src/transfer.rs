//! The scheduler: `concurrency` workers take runs of parts in file order (blob by blob) from one
//! shared queue, so at most that many ranged GETs are in flight across all blobs, over pooled
//! connections, and each blob's whole hash (when asked for) follows its transfer closely.
use std::collections::BTreeSet;
use std::mem;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::task::JoinSet;

use crate::client::HttpClient;
use crate::error::{Cause, Failure};
use crate::part::fetch_run;
use crate::spec::{Job, Options};
use crate::whole::{Frontier, Verdict};

/// What every worker shares: the jobs, the client, the limits, and the state Python polls.
pub struct Shared {
    pub client: HttpClient,
    pub options: Options,
    pub jobs: Vec<Job>,
    frontiers: Vec<Option<Frontier>>,
    written: Vec<Vec<AtomicU64>>, // per job, per part: bytes on disk from the part's start
    bytes: AtomicU64,
    retries: AtomicU64,
    parts: AtomicU64,
    news: Mutex<News>,
}

/// What happened since the last tick.
#[derive(Default)]
struct News {
    done: Vec<(usize, usize)>,
    active: BTreeSet<(usize, usize)>, // (job, position) of parts in progress
    digests: Vec<(usize, usize, String)>,
    verdicts: Vec<Verdict>,
}

/// Counters read by Python at each progress tick.
pub struct Tick {
    pub bytes: u64,
    pub done: Vec<(usize, usize)>,
    /// (job, part index, bytes on disk from its start) of every part in progress: a checkpoint.
    pub written: Vec<(usize, usize, u64)>,
    /// (job, part index, sha256 hex) of parts fetched with `record` and no digest of their own.
    pub digests: Vec<(usize, usize, String)>,
    pub verdicts: Vec<Verdict>,
}

pub struct Totals {
    pub bytes: u64,
    pub retries: u64,
    pub parts: u64,
}

impl Shared {
    pub fn new(client: HttpClient, options: Options, jobs: Vec<Job>) -> Self {
        let frontiers = jobs
            .iter()
            .map(|job| {
                job.whole
                    .as_ref()
                    .map(|w| Frontier::new(w, job.size, &job.parts))
            })
            .collect();
        let written = jobs
            .iter()
            .map(|job| job.parts.iter().map(|p| AtomicU64::new(p.kept)).collect())
            .collect();
        Shared {
            client,
            options,
            jobs,
            frontiers,
            written,
            bytes: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            parts: AtomicU64::new(0),
            news: Mutex::new(News::default()),
        }
    }

    pub fn frontier(&self, job_index: usize) -> Option<&Frontier> {
        self.frontiers[job_index].as_ref()
    }

    pub fn record_written(&self, job_index: usize, position: usize, bytes: u64) {
        self.written[job_index][position].store(bytes, Ordering::Relaxed);
    }

    pub fn record_digest(&self, job_index: usize, part_index: usize, hex: String) {
        self.news().digests.push((job_index, part_index, hex));
    }

    pub fn record_verdict(&self, verdict: Verdict) {
        self.news().verdicts.push(verdict);
    }

    pub fn count_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn part_started(&self, job_index: usize, position: usize) {
        self.news().active.insert((job_index, position));
    }

    pub fn part_done(&self, job_index: usize, position: usize) {
        self.parts.fetch_add(1, Ordering::Relaxed);
        let mut news = self.news();
        news.active.remove(&(job_index, position));
        news.done
            .push((job_index, self.jobs[job_index].parts[position].index));
    }

    /// Bytes written in total so far, what finished since the last call, and a checkpoint of
    /// every part in progress.
    pub fn take_tick(&self) -> Tick {
        let mut news = self.news();
        let written = news
            .active
            .iter()
            .map(|&(j, p)| {
                let bytes = self.written[j][p].load(Ordering::Relaxed);
                (j, self.jobs[j].parts[p].index, bytes)
            })
            .collect();
        Tick {
            bytes: self.bytes.load(Ordering::Relaxed),
            done: mem::take(&mut news.done),
            written,
            digests: mem::take(&mut news.digests),
            verdicts: mem::take(&mut news.verdicts),
        }
    }

    pub fn totals(&self) -> Totals {
        Totals {
            bytes: self.bytes.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            parts: self.parts.load(Ordering::Relaxed),
        }
    }

    fn news(&self) -> MutexGuard<'_, News> {
        // A worker never panics while holding the lock, and the lists stay valid even if one did.
        self.news
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Fetches every part of every job; on the first failure the other workers are cancelled
/// (their requests dropped) and that failure is returned. A job whose bytes are all kept but whose
/// whole hash is asked for is judged from disk.
pub async fn run(shared: Arc<Shared>) -> Result<(), Box<Failure>> {
    let queue = Arc::new(runs(&shared.jobs, shared.options.concurrency));
    judge_kept_jobs(&shared).await;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..shared.options.concurrency.min(queue.len()) {
        let (shared, queue, next) = (shared.clone(), queue.clone(), next.clone());
        workers.spawn(async move { worker(&shared, &queue, &next).await });
    }
    while let Some(joined) = workers.join_next().await {
        let outcome = joined.unwrap_or_else(|e| Err(panicked(&shared.jobs, e)));
        if let Err(failure) = outcome {
            workers.abort_all();
            return Err(failure);
        }
    }
    Ok(())
}

/// Bytes one ranged GET asks for at most. Each request costs the server a fixed amount of work (on
/// SeaweedFS here, about 1.6 ms of CPU: 8 streams of 64 MiB ranges took 9 % less server CPU than of
/// 16 MiB ones); MinIO reads an object's metadata for each. Parts stay the unit of checking and of
/// checkpoints, so a bad part still costs one part to refetch.
const RUN_BYTES: u64 = 64 << 20;

/// The work queue: `(job, positions)` runs of adjacent parts, blob by blob in file order, each
/// fetched with one request. A run is at most [`RUN_BYTES`], and short enough that there are about
/// four runs per stream (a small model keeps every stream busy); a part with kept bytes is a run of
/// its own (the request would otherwise skip over them), and so is one with a window (its request
/// has the shape a repair chose).
fn runs(jobs: &[Job], concurrency: usize) -> Vec<(usize, Range<usize>)> {
    let missing: u64 = jobs
        .iter()
        .flat_map(|job| job.parts.iter().map(|p| p.length - p.kept))
        .sum();
    let budget = (missing / (4 * concurrency as u64)).min(RUN_BYTES);
    let mut queue = Vec::new();
    for (j, job) in jobs.iter().enumerate() {
        let mut start = 0;
        while start < job.parts.len() {
            let first = &job.parts[start];
            let (mut end, mut bytes) = (start + 1, first.length);
            while first.kept == 0 && !first.windowed() && end < job.parts.len() {
                let (prev, next) = (&job.parts[end - 1], &job.parts[end]);
                let adjacent =
                    prev.offset + prev.length == next.offset && next.kept == 0 && !next.windowed();
                if !adjacent || bytes + next.length > budget {
                    break;
                }
                bytes += next.length;
                end += 1;
            }
            queue.push((j, start..end));
            start = end;
        }
    }
    queue
}

async fn judge_kept_jobs(shared: &Arc<Shared>) {
    for (j, job) in shared.jobs.iter().enumerate() {
        if let Some(frontier) = shared.frontier(j).filter(|f| !f.has_parts()) {
            let verdict = tokio::task::block_in_place(|| frontier.finish(j, &job.path));
            shared.record_verdict(verdict);
        }
    }
}

async fn worker(
    shared: &Shared,
    queue: &[(usize, Range<usize>)],
    next: &AtomicUsize,
) -> Result<(), Box<Failure>> {
    while let Some((j, positions)) = queue.get(next.fetch_add(1, Ordering::Relaxed)) {
        fetch_run(shared, *j, positions.clone()).await?;
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
