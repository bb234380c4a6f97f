//! A run of parts: one ranged GET, bytes streamed to their file offsets and each part hashed as they
//! arrive, retried from the first byte still missing.
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::body::Incoming;
use tokio::task::block_in_place;
use tokio::time::{sleep, timeout};

use crate::client::{range_request, untrusted};
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
    file: &'a File,
}

/// The part a run is filling, with the retries left to it (each part has its own budget).
struct Current {
    position: usize,
    state: PartState,
    attempt: u32,
    stalls: Stalls,
}

/// Fetches the parts at `positions` of job `job_index` (adjacent, in file order; only the first may
/// have kept bytes) into its file with one ranged GET for all of them, each part checked as its last
/// byte lands; after a failure the next request starts at the first byte still missing. Retries with
/// jittered backoff until every part lands verified or a part's retries run out.
pub async fn fetch_run(
    shared: &Shared,
    job_index: usize,
    positions: Range<usize>,
) -> Result<(), Box<Failure>> {
    let job = &shared.jobs[job_index];
    let file = File::options()
        .read(true)
        .write(true)
        .open(&job.path)
        .map_err(|e| {
            failure(
                Cause::File(e),
                0,
                job_index,
                job,
                &job.parts[positions.start],
            )
        })?;
    let run = Run {
        shared,
        job_index,
        job,
        file: &file,
        end: positions.end,
    };
    let mut current = run.begin(positions.start)?;
    loop {
        let (cause, after) = match run.try_once(&mut current).await {
            Ok(()) => return Ok(()),
            Err(Attempt::Fatal(cause)) => return Err(run.failure(&current, cause)),
            Err(Attempt::Retry { cause, after }) => (cause, after),
        };
        let options = &shared.options;
        if current.attempt >= options.max_retries || current.stalls.exhausted(&cause) {
            return Err(run.failure(&current, cause));
        }
        let wait = match after {
            Some(asked) => policy::honour(asked, options.backoff_max),
            None => policy::delay(current.attempt, options.backoff_base, options.backoff_max),
        };
        shared.count_retry();
        current.attempt += 1;
        sleep(wait).await;
    }
}

/// One worker's run of parts of one job.
struct Run<'a> {
    shared: &'a Shared,
    job_index: usize,
    job: &'a Job,
    file: &'a File,
    end: usize, // one past the run's last position
}

impl Run<'_> {
    fn target(&self, position: usize) -> Target<'_> {
        Target {
            shared: self.shared,
            job_index: self.job_index,
            position,
            job: self.job,
            part: &self.job.parts[position],
            file: self.file,
        }
    }

    fn failure(&self, current: &Current, cause: Cause) -> Box<Failure> {
        self.target(current.position)
            .failure(cause, current.attempt)
    }

    /// Starts filling the part at `position`: kept bytes are read back into its digest.
    fn begin(&self, position: usize) -> Result<Current, Box<Failure>> {
        let target = self.target(position);
        let mut state = PartState::new(self.job, target.part);
        self.shared.part_started(self.job_index, position);
        if state.hasher.is_some() && target.part.kept > 0 {
            // Kept bytes are re-checked with the rest of the part: read them back into its hash.
            if let Err(e) = block_in_place(|| hash_kept(&target, &mut state)) {
                return Err(target.failure(Cause::File(e), 0));
            }
        }
        self.shared
            .record_written(self.job_index, position, state.received);
        Ok(Current {
            position,
            state,
            attempt: 0,
            stalls: Stalls::new(&self.shared.options),
        })
    }

    /// The last byte of the run: the end of the range every request asks for (its window's trail
    /// included).
    fn last_byte(&self) -> u64 {
        let last = &self.job.parts[self.end - 1];
        last.offset + last.length - 1 + last.trail
    }

    /// One request for everything the run still misses, from the current part on. A part whose
    /// bytes are all kept is checked without a request (such a part is always a run of its own).
    async fn try_once(&self, current: &mut Current) -> Result<(), Attempt> {
        let mut body = None;
        loop {
            let target = self.target(current.position);
            let part = target.part;
            if current.state.received < part.length {
                if body.is_none() {
                    let start = part.offset + current.state.received;
                    // A window's lead is asked for with the part's first byte, then discarded.
                    let lead = if current.state.received == 0 {
                        part.lead
                    } else {
                        0
                    };
                    let (skip, incoming) =
                        request_range(self.shared, self.job, start - lead, self.last_byte())
                            .await?;
                    body = Some(Reader::new(incoming, skip + lead, &self.shared.options));
                }
                let stream = body.as_mut().expect("requested above");
                stream.fill(&target, &mut current.state).await?;
            }
            check_digest(part, &mut current.state)?;
            target.finished(&current.state);
            self.shared.part_done(self.job_index, current.position);
            if current.position + 1 == self.end {
                if let Some(stream) = body {
                    stream.finish(self.shared.options.read_timeout).await;
                }
                return Ok(());
            }
            *current = self
                .begin(current.position + 1)
                .map_err(|f| Attempt::Fatal(f.cause))?;
        }
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
    hash_range(target.file, target.part.offset, target.part.kept, |b| {
        hasher.update(b)
    })
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

/// One response body, read chunk by chunk across the parts of a run: a chunk that spans two parts
/// is split between them. Nothing is buffered beyond the chunk hyper hands over.
struct Reader {
    incoming: Incoming,
    skip: u64,
    pending: Bytes,
    pace: Pace,
}

impl Reader {
    fn new(incoming: Incoming, skip: u64, options: &crate::spec::Options) -> Self {
        Reader {
            incoming,
            skip,
            pending: Bytes::new(),
            pace: Pace::new(options),
        }
    }

    /// Writes the body's next bytes to the part's place in the file until the part is whole.
    async fn fill(&mut self, target: &Target<'_>, state: &mut PartState) -> Result<(), Attempt> {
        let (shared, part) = (target.shared, target.part);
        while state.received < part.length {
            if self.pending.is_empty() {
                self.pending = self.next_chunk(state.received, part.length).await?;
                continue;
            }
            let take = (part.length - state.received).min(self.pending.len() as u64) as usize;
            let data = self.pending.split_to(take);
            let at = part.offset + state.received;
            // A page-cache write; if writeback throttles it, stalling this worker is the backpressure we want.
            target
                .file
                .write_all_at(&data, at)
                .map_err(|e| Attempt::Fatal(Cause::File(e)))?;
            if let Some(hasher) = state.hasher.as_mut() {
                hasher.update(&data);
            }
            state.received += take as u64;
            target.written(state.received, at, &data);
            self.pace.record(take as u64).map_err(Attempt::retry)?;
            if state.received > state.counted {
                shared.count_bytes(state.received - state.counted);
                state.counted = state.received;
            }
        }
        Ok(())
    }

    /// The next bytes of the body past the leading ones to skip (empty for a frame without data).
    async fn next_chunk(&mut self, received: u64, length: u64) -> Result<Bytes, Attempt> {
        let frame = match timeout(self.pace.wait(), self.incoming.frame()).await {
            Err(_) => {
                self.pace.idle().map_err(Attempt::retry)?;
                return Ok(Bytes::new());
            }
            Ok(None) => {
                return Err(transport(format!(
                    "body ended after {received} of {length} bytes of a part"
                )));
            }
            Ok(Some(Err(e))) => return Err(transport(describe(&e))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(mut data) = frame.into_data() else {
            return Ok(Bytes::new()); // trailers carry no bytes
        };
        let discard = self.skip.min(data.len() as u64);
        data.advance(discard as usize);
        self.skip -= discard;
        Ok(data)
    }

    /// After the run's last byte: a chunked body's terminating chunk is read so the connection can
    /// go back to the pool. (With a Content-Length, hyper knows the end already; the rest of a
    /// whole-object body is dropped with its connection.)
    async fn finish(mut self, read_timeout: Duration) {
        if self.incoming.size_hint().exact().is_none() {
            let _ = timeout(read_timeout, self.incoming.frame()).await;
        }
    }
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

/// A request that failed before its head: a refused certificate is fatal (no retry makes it valid), a
/// failed or timed-out connect counts as no answer.
fn network(err: &hyper_util::client::legacy::Error) -> Attempt {
    if let Some(why) = untrusted(err) {
        return Attempt::Fatal(Cause::Untrusted(why));
    }
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
