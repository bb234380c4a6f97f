//! One part: ranged GET, bytes streamed to their file offset and hashed as they arrive, retried.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use bytes::Buf;
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::body::Incoming;
use tokio::task::block_in_place;
use tokio::time::{sleep, timeout};

use crate::client::range_request;
use crate::deadline::{is_unreachable, Pace, Stalls};
use crate::digest::{PartAlgorithm, PartHasher};
use crate::error::{Attempt, Cause, Failure};
use crate::policy;
use crate::readback::hash_range;
use crate::response::body_skip;
use crate::spec::{to_hex, Job, PartSpec};
use crate::transfer::Shared;

/// Progress through one part, kept across attempts: after a broken connection the next request
/// asks only for the bytes still missing and the running hash carries on. Only a digest mismatch
/// starts the part over.
struct PartState {
    received: u64,
    hasher: Option<PartHasher>, // only when the part has a digest to meet or one to record
    counted: u64, // bytes already added to the shared counter: progress never counts a byte twice
}

impl PartState {
    fn new(job: &Job, part: &PartSpec) -> Self {
        PartState {
            received: part.kept,
            hasher: digest_kind(job, part).map(PartHasher::new),
            counted: part.kept,
        }
    }

    fn restart(&mut self) {
        self.received = 0;
        if let Some(hasher) = self.hasher.as_mut() {
            *hasher = PartHasher::new(hasher.algorithm());
        }
    }
}

/// The job's part digest for a part that has one to meet; sha256 for one fetched to `record` (repair
/// by agreeing reads compares those); none otherwise.
fn digest_kind(job: &Job, part: &PartSpec) -> Option<PartAlgorithm> {
    match (part.digest, job.record) {
        (Some(_), _) => Some(job.part_digest),
        (None, true) => Some(PartAlgorithm::Sha256),
        (None, false) => None,
    }
}

/// What one worker needs to land one part: where it goes and who to tell.
struct Target<'a> {
    shared: &'a Shared,
    job_index: usize,
    position: usize,
    job: &'a Job,
    part: &'a PartSpec,
    file: File,
}

/// Fetches the part at `position` of job `job_index` into its file, retrying with jittered backoff
/// until it lands verified or the retries run out; then tells the job's whole-blob hash.
pub async fn fetch_part(
    shared: &Shared,
    job_index: usize,
    position: usize,
) -> Result<(), Box<Failure>> {
    let job = &shared.jobs[job_index];
    let part = &job.parts[position];
    let file = File::options()
        .read(true)
        .write(true)
        .open(&job.path)
        .map_err(|e| failure(Cause::File(e), 0, job_index, job, part))?;
    let target = Target {
        shared,
        job_index,
        position,
        job,
        part,
        file,
    };
    let mut state = PartState::new(job, part);
    if state.hasher.is_some() && part.kept > 0 {
        // Kept bytes are re-checked with the rest of the part: read them back into its hash.
        if let Err(e) = block_in_place(|| hash_kept(&target, &mut state)) {
            return Err(failure(Cause::File(e), 0, job_index, job, part));
        }
    }
    shared.record_written(job_index, position, state.received);
    retry_part(&target, &mut state).await?;
    target.finished(&state);
    Ok(())
}

async fn retry_part(target: &Target<'_>, state: &mut PartState) -> Result<(), Box<Failure>> {
    let options = &target.shared.options;
    let mut attempt = 0u32;
    let mut stalls = Stalls::new(options);
    loop {
        let (cause, after) = match try_once(target, state).await {
            Ok(()) => return Ok(()),
            Err(Attempt::Fatal(cause)) => return Err(target.failure(cause, attempt)),
            Err(Attempt::Retry { cause, after }) => (cause, after),
        };
        if attempt >= options.max_retries || stalls.exhausted(&cause) {
            return Err(target.failure(cause, attempt));
        }
        let wait = match after {
            Some(asked) => policy::honour(asked, options.backoff_max),
            None => policy::delay(attempt, options.backoff_base, options.backoff_max),
        };
        target.shared.count_retry();
        attempt += 1;
        sleep(wait).await;
    }
}

impl Target<'_> {
    fn failure(&self, cause: Cause, attempt: u32) -> Box<Failure> {
        failure(cause, attempt, self.job_index, self.job, self.part)
    }

    /// `received` bytes of the part are on disk. For the whole-blob hash they are final only when
    /// the part has no digest of its own to meet (else it waits for the part's check).
    fn written(&self, received: u64, at: u64, chunk: &[u8]) {
        self.shared
            .record_written(self.job_index, self.position, received);
        if self.part.digest.is_none() {
            if let Some(frontier) = self.shared.frontier(self.job_index) {
                if frontier.advance(self.position, received, at, Some(chunk)) {
                    block_in_place(|| frontier.catch_up(&self.job.path));
                }
            }
        }
    }

    /// The part is whole and checked: record its digest if asked, publish it to the whole-blob
    /// hash, and judge the blob if this was its last part.
    fn finished(&self, state: &PartState) {
        let shared = self.shared;
        if self.part.digest.is_none() && self.job.record {
            if let Some(hasher) = &state.hasher {
                let hex = to_hex(&hasher.digest());
                shared.record_digest(self.job_index, self.part.index, hex);
            }
        }
        if let Some(frontier) = shared.frontier(self.job_index) {
            let (end, path) = (self.part.offset + self.part.length, &self.job.path);
            block_in_place(|| {
                if frontier.advance(self.position, self.part.length, end, None) {
                    frontier.catch_up(path);
                }
                if frontier.part_finished() {
                    shared.record_verdict(frontier.finish(self.job_index, path));
                }
            });
        }
    }
}

fn hash_kept(target: &Target<'_>, state: &mut PartState) -> std::io::Result<()> {
    let hasher = state.hasher.as_mut().expect("only called with a hasher");
    hash_range(&target.file, target.part.offset, target.part.kept, |b| {
        hasher.update(b)
    })
}

async fn try_once(target: &Target<'_>, state: &mut PartState) -> Result<(), Attempt> {
    let part = target.part;
    if state.received < part.length {
        let start = part.offset + state.received;
        let end = part.offset + part.length - 1;
        let (skip, body) = request_range(target.shared, target.job, start, end).await?;
        stream_to_file(target, state, body, skip).await?;
    }
    check_digest(part, state)
}

/// The response body for bytes `start..=end`, and how many leading bytes of it to discard.
async fn request_range(
    shared: &Shared,
    job: &Job,
    start: u64,
    end: u64,
) -> Result<(u64, Incoming), Attempt> {
    let wait = shared
        .options
        .read_timeout
        .max(shared.options.connect_timeout);
    let request = shared.client.request(range_request(job, start, end));
    let response = timeout(wait, request)
        .await
        .map_err(|_| stalled(format!("no response within {}", seconds(wait))))?
        .map_err(|e| network(&e))?;
    let (head, body) = response.into_parts();
    let skip = body_skip(&head, start, end)?;
    Ok((skip, body))
}

/// Streams the body chunk by chunk to the part's place in the file; nothing is buffered beyond
/// the chunk hyper hands over.
async fn stream_to_file(
    target: &Target<'_>,
    state: &mut PartState,
    mut body: Incoming,
    mut skip: u64,
) -> Result<(), Attempt> {
    let (shared, part) = (target.shared, target.part);
    let read_timeout = shared.options.read_timeout;
    let mut pace = Pace::new(&shared.options);
    while state.received < part.length {
        let frame = match timeout(pace.wait(), body.frame()).await {
            Err(_) => {
                pace.idle().map_err(Attempt::retry)?;
                continue;
            }
            Ok(None) => {
                let got = state.received;
                return Err(transport(format!(
                    "body ended after {got} of {} bytes",
                    part.length
                )));
            }
            Ok(Some(Err(e))) => return Err(transport(describe(&e))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(mut data) = frame.into_data() else {
            continue; // trailers carry no bytes
        };
        let discard = skip.min(data.len() as u64);
        data.advance(discard as usize);
        skip -= discard;
        let take = (part.length - state.received).min(data.len() as u64) as usize;
        let chunk = &data[..take];
        let at = part.offset + state.received;
        // A page-cache write; if writeback throttles it, stalling this worker is the backpressure we want.
        target
            .file
            .write_all_at(chunk, at)
            .map_err(|e| Attempt::Fatal(Cause::File(e)))?;
        if let Some(hasher) = state.hasher.as_mut() {
            hasher.update(chunk);
        }
        state.received += take as u64;
        target.written(state.received, at, chunk);
        pace.record(take as u64).map_err(Attempt::retry)?;
        if state.received > state.counted {
            shared.count_bytes(state.received - state.counted);
            state.counted = state.received;
        }
    }
    if body.size_hint().exact().is_none() {
        // A chunked body: read its terminating chunk so the connection can go back to the pool.
        // (With a Content-Length, hyper knows the end already; the rest of a whole-object body is
        // dropped with its connection.)
        let _ = timeout(read_timeout, body.frame()).await;
    }
    Ok(())
}

fn check_digest(part: &PartSpec, state: &mut PartState) -> Result<(), Attempt> {
    let (Some(expected), Some(hasher)) = (part.digest, &state.hasher) else {
        return Ok(());
    };
    let actual = hasher.digest();
    if actual == expected {
        return Ok(());
    }
    let algorithm = hasher.algorithm().name();
    state.restart();
    Err(Attempt::retry(Cause::Digest {
        algorithm,
        expected: to_hex(&expected),
        actual: to_hex(&actual),
    }))
}

fn failure(
    cause: Cause,
    attempt: u32,
    job_index: usize,
    job: &Job,
    part: &PartSpec,
) -> Box<Failure> {
    Box::new(Failure {
        cause,
        path: job.path.clone(),
        offset: part.offset,
        length: part.length,
        job_index,
        part_index: part.index,
        url: job.shown_url.clone(),
        attempts: attempt + 1,
    })
}

fn transport(text: String) -> Attempt {
    Attempt::retry(Cause::Transport(text))
}

fn stalled(text: String) -> Attempt {
    Attempt::retry(Cause::Unanswered(text))
}

/// A request that failed before its head: a failed or timed-out connect counts as no answer.
fn network(err: &hyper_util::client::legacy::Error) -> Attempt {
    match is_unreachable(err) {
        true => stalled(describe(err)),
        false => transport(describe(err)),
    }
}

/// An error and its chain of causes on one line ("client error (Connect): tcp connect error: ...").
pub fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn seconds(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}
