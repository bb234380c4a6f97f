//! Small GETs for the pull's control plane (listing pages, refs, the manifest and the sidecar), all at
//! once on one runtime: Python needs neither `http.client` nor threads for them, and a ref, a manifest
//! and a sidecar cost one round trip together.
// pyo3 0.22's `#[pyfunction]` expansion trips `useless_conversion` on the PyResult return type.
#![allow(clippy::useless_conversion)]
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{CONTENT_LENGTH, ETAG, RETRY_AFTER};
use hyper::{Request, Uri};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::client::{self, untrusted, HttpClient};
use crate::deadline::{is_unreachable, Pace};
use crate::error::redact;
use crate::part::describe;
use crate::spec::Options;

/// The error text of an answer over `limit` (Python refuses it as metadata, without a retry).
const TOO_LARGE: &str = "too large";

/// One answer: `(status, etag, retry_after, body, error)`; `status` 0 and `error` set when no usable
/// answer came. `error` starts with `stalled:` when the server did not answer in time, was out of reach,
/// or sent its body below the minimum rate (retried `stall_retries` times by the caller), with
/// `failed:` for a broken connection or body (retried like a 503), with `untrusted:` when the server's
/// TLS certificate was refused (never retried), and is `too large` over `limit`.
type Answer = (u16, Option<String>, Option<String>, Vec<u8>, Option<String>);

/// GET every URL at once, with the same deadlines as a ranged GET (connect, first byte, silence,
/// minimum rate over a window); answers in the order of `urls`. Signals are checked every 0.1 s, so
/// SIGTERM stops a pull waiting on a silent server. `ca_file` / `ca_dir`: the CAs an https server must
/// chain to (neither: the system store).
#[pyfunction]
#[pyo3(signature = (
    urls, *, connect_timeout = 5.0, read_timeout = 30.0, min_rate = 0.0, rate_window = 20.0,
    limit = 67108864, ca_file = None, ca_dir = None,
))]
#[allow(clippy::too_many_arguments)]
pub fn get_small(
    py: Python<'_>,
    urls: Vec<String>,
    connect_timeout: f64,
    read_timeout: f64,
    min_rate: f64,
    rate_window: f64,
    limit: usize,
    ca_file: Option<PathBuf>,
    ca_dir: Option<PathBuf>,
) -> PyResult<Vec<PyObject>> {
    let options = Options::new(
        urls.len().max(1),
        connect_timeout,
        read_timeout,
        0,
        0.0,
        0.0,
        0.1,
    )?
    .with_deadlines(min_rate, rate_window, 0)?
    .with_trust(ca_file, ca_dir);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the runtime: {e}")))?;
    let client = client::build(&options);
    let mut tasks = JoinSet::new();
    for (i, url) in urls.into_iter().enumerate() {
        let (client, options) = (client.clone(), options.clone());
        tasks.spawn_on(
            async move { (i, get_one(&client, &url, &options, limit).await) },
            runtime.handle(),
        );
    }
    let mut answers: Vec<Option<Answer>> = vec![None; tasks.len()];
    while !tasks.is_empty() {
        let joined = py.allow_threads(|| {
            runtime.block_on(async { timeout(Duration::from_millis(100), tasks.join_next()).await })
        });
        match joined {
            Ok(Some(Ok((i, answer)))) => answers[i] = Some(answer),
            Ok(Some(Err(e))) => return Err(PyRuntimeError::new_err(format!("request task: {e}"))),
            Ok(None) => break,
            Err(_) => py.check_signals()?,
        }
    }
    Ok(answers
        .into_iter()
        .map(|a| {
            let (status, etag, retry, body, error) = a.unwrap_or_default();
            (status, etag, retry, PyBytes::new_bound(py, &body), error).into_py(py)
        })
        .collect())
}

fn failed(kind: &str, why: &str) -> Answer {
    (
        0,
        None,
        None,
        Vec::new(),
        Some(format!("{kind}: {}", redact(why))),
    )
}

async fn get_one(client: &HttpClient, url: &str, options: &Options, limit: usize) -> Answer {
    let Ok(uri) = url.parse::<Uri>() else {
        return failed("failed", "not a valid URL");
    };
    let mut request = Request::new(Empty::<Bytes>::new());
    *request.uri_mut() = uri;
    let head_wait = options.read_timeout.max(options.connect_timeout);
    let response = match timeout(head_wait, client.request(request)).await {
        Err(_) => {
            let why = format!(
                "no answer within the first-byte deadline ({:.1} s)",
                head_wait.as_secs_f64()
            );
            return failed("stalled", &why);
        }
        Ok(Err(e)) => {
            if let Some(why) = untrusted(&e) {
                return failed("untrusted", &format!("TLS certificate refused: {why}"));
            }
            if is_unreachable(&e) {
                let why = format!(
                    "cannot connect to the object storage endpoint ({})",
                    describe(&e)
                );
                return failed("stalled", &why);
            }
            return failed("failed", &describe(&e));
        }
        Ok(Ok(response)) => response,
    };
    let (head, mut body) = response.into_parts();
    let header = |name| {
        head.headers
            .get(name)
            .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    if header(CONTENT_LENGTH)
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > limit)
    {
        return (0, None, None, Vec::new(), Some(TOO_LARGE.into()));
    }
    let mut data = Vec::new();
    let mut pace = Pace::new(options);
    loop {
        let frame = match timeout(pace.wait(), body.frame()).await {
            Err(_) => match pace.idle() {
                Ok(()) => continue,
                Err(cause) => return failed("stalled", &cause.to_string()),
            },
            Ok(None) => break,
            Ok(Some(Err(e))) => return failed("failed", &format!("body: {}", describe(&e))),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        if data.len() + chunk.len() > limit {
            return (0, None, None, Vec::new(), Some(TOO_LARGE.into()));
        }
        data.extend_from_slice(&chunk);
        if let Err(cause) = pace.record(chunk.len() as u64) {
            return failed("stalled", &cause.to_string());
        }
    }
    (
        head.status.as_u16(),
        header(ETAG),
        header(RETRY_AFTER),
        data,
        None,
    )
}
