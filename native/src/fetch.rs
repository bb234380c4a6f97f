//! `fetch`, the one function Python calls: run the transfer with the GIL released, waking every
//! `progress_interval` to let Python signal handlers run and to report progress.

// pyo3 0.22's `#[pyfunction]` expansion trips `useless_conversion` on the PyResult return type.
#![allow(clippy::useless_conversion)]
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tokio::runtime::Runtime;
use tokio::time::timeout;

use crate::client;
use crate::error::FetchError;
use crate::policy;
use crate::spec::{Job, JobArg, Options};
use crate::transfer::Tick;
use crate::transfer::{self, Shared, Totals};

/// Fetch byte ranges of objects into existing files and return `{"bytes", "retries", "parts"}`.
///
/// `jobs` is a list of dicts `{"url", "headers", "path", "size", "parts"}`, `parts` a list of
/// `(index, offset, length, digest_hex | None)`, the digest a sha256 or, with `"part_digest":
/// "blake3"`, a BLAKE3. `progress(bytes_delta, done_parts)` is called every
/// `progress_interval` seconds with `done_parts` the `(job_index, part.index)` pairs finished since the
/// previous call. If a signal handler or `progress` raises, in-flight requests are dropped and that
/// exception propagates.
///
/// `report(news)`, when given, is called on the same ticks with a dict of what else happened:
/// `written`, `(job_index, part.index, bytes)` for every part in progress (bytes on disk from the
/// part's start, for a checkpoint that survives SIGKILL); `digests`, `(job_index, part.index, hex)`
/// for parts fetched with `record`; `verdicts`, `(job_index, ok, actual_hex)` for each job with a
/// `whole` digest once its last byte is hashed. A job whose whole hash fails is reported, not raised:
/// the other jobs carry on.
///
/// `concurrency` bounds the ranged GETs in flight across all jobs. `read_timeout` is the longest wait
/// for the next body bytes, and for the response head from the request's start (a new connection's
/// `connect_timeout` included, never less than it). A part is retried on
/// a broken or stalled connection, a short body, a digest mismatch, 408/429/5xx (`Retry-After` honoured
/// up to `backoff_max`), otherwise after a full-jitter backoff; other statuses fail at once.
/// A body averaging under `min_rate` bytes/s over any `rate_window` seconds is dropped and retried, as
/// is a silence of `read_timeout`; such stalls get `stall_retries` retries (default: `max_retries`).
/// `HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY` / `NO_PROXY` are honoured as curl reads them. An https
/// server's certificate must chain to `ca_file` / `ca_dir` (neither: the system store); one that does
/// not fails the fetch at once with `CertificateError`.
#[pyfunction]
#[pyo3(signature = (
    jobs, *, concurrency = 8, connect_timeout = 5.0, read_timeout = 30.0,
    max_retries = policy::MAX_RETRIES, backoff_base = policy::BACKOFF_BASE,
    backoff_max = policy::BACKOFF_CAP, progress = None, progress_interval = 0.1, report = None,
    min_rate = 0.0, rate_window = 20.0, stall_retries = None, ca_file = None, ca_dir = None,
))]
#[allow(clippy::too_many_arguments)]
pub fn fetch(
    py: Python<'_>,
    jobs: Vec<JobArg>,
    concurrency: usize,
    connect_timeout: f64,
    read_timeout: f64,
    max_retries: u32,
    backoff_base: f64,
    backoff_max: f64,
    progress: Option<PyObject>,
    progress_interval: f64,
    report: Option<PyObject>,
    min_rate: f64,
    rate_window: f64,
    stall_retries: Option<u32>,
    ca_file: Option<PathBuf>,
    ca_dir: Option<PathBuf>,
) -> PyResult<Py<PyDict>> {
    let options = Options::new(
        concurrency,
        connect_timeout,
        read_timeout,
        max_retries,
        backoff_base,
        backoff_max,
        progress_interval,
    )?
    .with_deadlines(min_rate, rate_window, stall_retries.unwrap_or(max_retries))?
    .with_trust(ca_file, ca_dir);
    let jobs = jobs
        .into_iter()
        .map(JobArg::into_job)
        .collect::<PyResult<Vec<Job>>>()?;
    let runtime = build_runtime(options.concurrency)?;
    let shared = Arc::new(Shared::new(client::build(&options), options.clone(), jobs));
    let mut transfer = runtime.spawn(transfer::run(shared.clone()));
    let mut reporter = Reporter::new(progress, report);

    let joined = loop {
        let interval = options.progress_interval;
        let finished = py.allow_threads(|| {
            runtime.block_on(async { timeout(interval, &mut transfer).await.ok() })
        });
        if let Some(joined) = finished {
            break joined;
        }
        if let Err(signal) = py.check_signals() {
            transfer.abort();
            shut_down(py, runtime);
            // Parts finished before the signal are whole and verified: hand them over for resume.
            // The signal's exception is what the caller must see, so a failing report is dropped.
            let _ = reporter.tick(py, &shared);
            return Err(signal);
        }
        if let Err(raised) = reporter.tick(py, &shared) {
            transfer.abort();
            shut_down(py, runtime);
            return Err(raised);
        }
    };
    shut_down(py, runtime);
    let reported = reporter.tick(py, &shared);
    match joined {
        Ok(Ok(())) => reported.and_then(|()| stats(py, shared.totals())),
        Ok(Err(failure)) => Err(failure.into_pyerr(py)),
        Err(join) => Err(FetchError::new_err(format!("transfer task failed: {join}"))),
    }
}

/// Hands byte deltas, finished parts, checkpoints, digests and verdicts to the Python callbacks.
struct Reporter {
    progress: Option<PyObject>,
    report: Option<PyObject>,
    reported_bytes: u64,
}

impl Reporter {
    fn new(progress: Option<PyObject>, report: Option<PyObject>) -> Self {
        Reporter {
            progress,
            report,
            reported_bytes: 0,
        }
    }

    /// Called on every tick, even with nothing new, so a callback can cancel a stalled transfer.
    fn tick(&mut self, py: Python<'_>, shared: &Shared) -> PyResult<()> {
        let tick = shared.take_tick();
        let delta = tick.bytes - self.reported_bytes;
        self.reported_bytes = tick.bytes;
        if let Some(report) = &self.report {
            report.call1(py, (news(py, &tick)?,))?;
        }
        match &self.progress {
            Some(callback) => callback.call1(py, (delta, tick.done)).map(drop),
            None => Ok(()),
        }
    }
}

fn news(py: Python<'_>, tick: &Tick) -> PyResult<Py<PyDict>> {
    let dict = PyDict::new_bound(py);
    dict.set_item("written", &tick.written)?;
    dict.set_item("digests", &tick.digests)?;
    let verdicts: Vec<(usize, bool, &str)> = tick
        .verdicts
        .iter()
        .map(|v| (v.job_index, v.ok, v.actual.as_str()))
        .collect();
    dict.set_item("verdicts", verdicts)?;
    Ok(dict.unbind())
}

fn build_runtime(concurrency: usize) -> PyResult<Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cpus.min(concurrency))
        .thread_name("simswarm-fetch")
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the transfer runtime: {e}")))
}

/// Drops every task (closing their connections); a DNS lookup stuck in the blocking pool is not
/// waited for beyond a moment.
fn shut_down(py: Python<'_>, runtime: Runtime) {
    py.allow_threads(move || runtime.shutdown_timeout(Duration::from_millis(200)));
}

fn stats(py: Python<'_>, totals: Totals) -> PyResult<Py<PyDict>> {
    let dict = PyDict::new_bound(py);
    dict.set_item("bytes", totals.bytes)?;
    dict.set_item("retries", totals.retries)?;
    dict.set_item("parts", totals.parts)?;
    Ok(dict.unbind())
}
