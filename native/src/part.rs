//! One part: ranged GET, bytes streamed to their file offset and hashed as they arrive, retried.
use std::os::unix::fs::FileExt;
use std::time::Duration;

use bytes::Buf;
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::body::Incoming;
use ring::digest::{Context, SHA256};
use tokio::time::{sleep, timeout};

use crate::backoff;
use crate::client::range_request;
use crate::deadline::{is_unreachable, Pace, Stalls};
use crate::error::{Attempt, Cause, Failure};
use crate::response::body_skip;
use crate::spec::{to_hex, Job, PartSpec};
use crate::transfer::Shared;

/// Progress through one part, kept across attempts: after a broken connection the next request
/// asks only for the bytes still missing and the running hash carries on. Only a digest mismatch
/// starts the part over.
struct PartState {
    received: u64,
    hasher: Context,
    counted: u64, // bytes already added to the shared counter: progress never counts a byte twice
}

impl PartState {
    fn new() -> Self {
        PartState {
            received: 0,
            hasher: Context::new(&SHA256),
            counted: 0,
        }
    }

    fn restart(&mut self) {
        self.received = 0;
        self.hasher = Context::new(&SHA256);
    }
}

/// Fetches `part` of `job` into its file, retrying with jittered backoff until it lands verified
/// or the retries run out.
pub async fn fetch_part(
    shared: &Shared,
    job_index: usize,
    job: &Job,
    part: &PartSpec,
) -> Result<(), Box<Failure>> {
    let options = &shared.options;
    let mut state = PartState::new();
    let mut attempt = 0u32;
    let mut stalls = Stalls::new(options);
    loop {
        let (cause, after) = match try_once(shared, job, part, &mut state).await {
            Ok(()) => return Ok(()),
            Err(Attempt::Fatal(cause)) => {
                return Err(failure(cause, attempt, job_index, job, part))
            }
            Err(Attempt::Retry { cause, after }) => (cause, after),
        };
        if attempt >= options.max_retries || stalls.exhausted(&cause) {
            return Err(failure(cause, attempt, job_index, job, part));
        }
        let wait = match after {
            Some(asked) => backoff::honour(asked, options.backoff_max),
            None => backoff::delay(attempt, options.backoff_base, options.backoff_max),
        };
        shared.count_retry();
        attempt += 1;
        sleep(wait).await;
    }
}

async fn try_once(
    shared: &Shared,
    job: &Job,
    part: &PartSpec,
    state: &mut PartState,
) -> Result<(), Attempt> {
    if state.received < part.length {
        let start = part.offset + state.received;
        let end = part.offset + part.length - 1;
        let (skip, body) = request_range(shared, job, start, end).await?;
        stream_to_file(shared, job, part, state, body, skip).await?;
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
    shared: &Shared,
    job: &Job,
    part: &PartSpec,
    state: &mut PartState,
    mut body: Incoming,
    mut skip: u64,
) -> Result<(), Attempt> {
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
        // A page-cache write; if writeback throttles it, stalling this worker is the backpressure we want.
        job.file
            .write_all_at(chunk, part.offset + state.received)
            .map_err(|e| Attempt::Fatal(Cause::File(e)))?;
        state.hasher.update(chunk);
        state.received += take as u64;
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
    let Some(expected) = part.sha256 else {
        return Ok(());
    };
    let actual = state.hasher.clone().finish();
    if actual.as_ref() == expected {
        return Ok(());
    }
    state.restart();
    Err(Attempt::retry(Cause::Digest {
        expected: to_hex(&expected),
        actual: to_hex(actual.as_ref()),
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
fn describe(err: &dyn std::error::Error) -> String {
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
