//! Small GETs for the pull's control plane (listing pages, refs, the manifest and the sidecar), all at
//! once on one runtime: Python needs neither `http.client` nor threads for them, and a ref, a manifest
//! and a sidecar cost one round trip together.
// pyo3 0.22's `#[pyfunction]` expansion trips `useless_conversion` on the PyResult return type.
#![allow(clippy::useless_conversion)]
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::header::{CONTENT_LENGTH, ETAG, RETRY_AFTER};
use hyper::{Request, Uri};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::client::{self, HttpClient};
use crate::error::redact;
use crate::part::describe;
use crate::spec::Options;

/// The error text of an answer over `limit` (Python refuses it as metadata, without a retry).
const TOO_LARGE: &str = "too large";

/// One answer: `(status, etag, retry_after, body, error)`; `status` 0 and `error` set when no answer
/// came (connection refused, timeout, broken body, over `limit`).
type Answer = (u16, Option<String>, Option<String>, Vec<u8>, Option<String>);

/// GET every URL at once; answers in the order of `urls`. Signals are checked every 0.1 s, so
/// SIGTERM stops a pull waiting on a silent server.
#[pyfunction]
#[pyo3(signature = (urls, *, connect_timeout = 5.0, read_timeout = 30.0, limit = 67108864))]
pub fn get_small(
    py: Python<'_>,
    urls: Vec<String>,
    connect_timeout: f64,
    read_timeout: f64,
    limit: usize,
) -> PyResult<Vec<PyObject>> {
    let options = Options::new(
        urls.len().max(1),
        connect_timeout,
        read_timeout,
        0,
        0.0,
        0.0,
        0.1,
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the runtime: {e}")))?;
    let client = client::build(&options);
    let wait = options.connect_timeout + options.read_timeout;
    let mut tasks = JoinSet::new();
    for (i, url) in urls.into_iter().enumerate() {
        let client = client.clone();
        tasks.spawn_on(
            async move { (i, get_one(&client, &url, wait, limit).await) },
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

async fn get_one(client: &HttpClient, url: &str, wait: Duration, limit: usize) -> Answer {
    let failed = |why: String| (0, None, None, Vec::new(), Some(redact(&why)));
    let Ok(uri) = url.parse::<Uri>() else {
        return failed("not a valid URL".into());
    };
    let mut request = Request::new(Empty::<Bytes>::new());
    *request.uri_mut() = uri;
    let response = match timeout(wait, client.request(request)).await {
        Err(_) => return failed(format!("no response within {:.1} s", wait.as_secs_f64())),
        Ok(Err(e)) => return failed(describe(&e)),
        Ok(Ok(response)) => response,
    };
    let (head, body) = response.into_parts();
    let header = |name| {
        head.headers
            .get(name)
            .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let (etag, retry) = (header(ETAG), header(RETRY_AFTER));
    let declared = header(CONTENT_LENGTH).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return failed(TOO_LARGE.into());
    }
    match timeout(wait, Limited::new(body, limit).collect()).await {
        Err(_) => failed(format!(
            "body not complete within {:.1} s",
            wait.as_secs_f64()
        )),
        Ok(Err(e)) if e.is::<LengthLimitError>() => failed(TOO_LARGE.into()),
        Ok(Err(e)) => failed(format!("body: {e}")),
        Ok(Ok(collected)) => (
            head.status.as_u16(),
            etag,
            retry,
            collected.to_bytes().to_vec(),
            None,
        ),
    }
}
