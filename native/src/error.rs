//! The Python exceptions of `agent._native` and the one Rust failure type that becomes them.
//!
//! Every message names the local file and the byte range, never a URL's query string: a presigned
//! URL's query is its signature, a credential.
use std::fmt;
use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(
    _native,
    FetchError,
    PyException,
    "Base of every error `fetch` raises; `.path`, `.offset`, `.length`, `.job_index` and `.part_index` say which part failed."
);
create_exception!(
    _native,
    HttpStatusError,
    FetchError,
    "The server answered a fatal status, or a retryable one until retries ran out; `.status` holds it."
);
create_exception!(
    _native,
    DigestMismatchError,
    FetchError,
    "A part's digest differed from the expected one on every attempt; `.expected` and `.actual` are hex."
);
create_exception!(
    _native,
    TransferError,
    FetchError,
    "Network failure, timeout or short body that persisted after retries."
);
create_exception!(
    _native,
    CertificateError,
    FetchError,
    "The server's TLS certificate was refused (not signed by a trusted CA, another host's, out of date): never retried."
);
create_exception!(
    _native,
    FileWriteError,
    FetchError,
    "The local file could not be opened or written; `.errno` holds the OS error number (or None)."
);

pub fn add_exceptions(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("FetchError", py.get_type_bound::<FetchError>())?;
    m.add("HttpStatusError", py.get_type_bound::<HttpStatusError>())?;
    m.add(
        "DigestMismatchError",
        py.get_type_bound::<DigestMismatchError>(),
    )?;
    m.add("TransferError", py.get_type_bound::<TransferError>())?;
    m.add("CertificateError", py.get_type_bound::<CertificateError>())?;
    m.add("FileWriteError", py.get_type_bound::<FileWriteError>())?;
    Ok(())
}

/// Why one attempt at a part failed.
#[derive(Debug)]
pub enum Cause {
    Status(u16),
    Digest {
        algorithm: &'static str,
        expected: String,
        actual: String,
    },
    Transport(String),
    /// No usable answer: the connection failed or timed out, no response head in time, a silence, or
    /// a body below the minimum rate. These get `stall_retries`, not `max_retries`.
    Unanswered(String),
    /// The server's TLS certificate was refused: a setting to fix, not retried.
    Untrusted(String),
    File(std::io::Error),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Status(code) => write!(f, "server answered HTTP {code}"),
            Cause::Digest {
                algorithm,
                expected,
                actual,
            } => {
                write!(
                    f,
                    "{algorithm} {actual} does not match the expected {expected}"
                )
            }
            Cause::Transport(text) | Cause::Unanswered(text) => f.write_str(text),
            Cause::Untrusted(text) => write!(f, "TLS certificate refused: {text}"),
            Cause::File(err) => write!(f, "local write failed: {err}"),
        }
    }
}

/// Which part failed, and why, after `attempts` tries.
#[derive(Debug)]
pub struct Failure {
    pub cause: Cause,
    pub path: PathBuf,
    pub offset: u64,
    pub length: u64,
    pub job_index: usize,
    pub part_index: usize,
    pub url: String, // already redacted
    pub attempts: u32,
}

impl Failure {
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        let message = self.message();
        let err = match &self.cause {
            Cause::Status(_) => HttpStatusError::new_err(message),
            Cause::Digest { .. } => DigestMismatchError::new_err(message),
            Cause::Transport(_) | Cause::Unanswered(_) => TransferError::new_err(message),
            Cause::Untrusted(_) => CertificateError::new_err(message),
            Cause::File(_) => FileWriteError::new_err(message),
        };
        // Attributes are best effort: a failure here must not hide the transfer error itself.
        let _ = self.set_attributes(err.value_bound(py));
        err
    }

    fn message(&self) -> String {
        let end = (self.offset + self.length).saturating_sub(1);
        let tries = match self.attempts {
            1 => String::new(),
            n => format!(" after {n} attempts"),
        };
        let text = format!(
            "{}: bytes {}-{}: {}{} (GET {})",
            self.path.display(),
            self.offset,
            end,
            self.cause,
            tries,
            self.url
        );
        redact(&text)
    }

    fn set_attributes(&self, value: &Bound<'_, pyo3::exceptions::PyBaseException>) -> PyResult<()> {
        value.setattr("path", self.path.to_string_lossy().into_owned())?;
        value.setattr("offset", self.offset)?;
        value.setattr("length", self.length)?;
        value.setattr("job_index", self.job_index)?;
        value.setattr("part_index", self.part_index)?;
        value.setattr("attempts", self.attempts)?;
        match &self.cause {
            Cause::Status(code) => value.setattr("status", *code),
            Cause::Digest {
                expected, actual, ..
            } => {
                value.setattr("expected", expected)?;
                value.setattr("actual", actual)
            }
            Cause::File(err) => value.setattr("errno", err.raw_os_error()),
            Cause::Transport(_) | Cause::Unanswered(_) | Cause::Untrusted(_) => Ok(()),
        }
    }
}

/// `text` with every query string cut out: from each '?' up to the next whitespace or ')'.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_query = false;
    for c in text.chars() {
        if c == '?' {
            in_query = true;
        } else if in_query && (c.is_whitespace() || c == ')') {
            in_query = false;
        }
        if !in_query {
            out.push(c);
        }
    }
    out
}

/// A URL without its query string (the signature) and fragment: safe to show.
pub fn redact_url(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or_default().to_owned()
}

/// The outcome of one failed attempt at a part: worth another try, or not.
#[derive(Debug)]
pub enum Attempt {
    Retry {
        cause: Cause,
        after: Option<std::time::Duration>,
    },
    Fatal(Cause),
}

impl Attempt {
    pub fn retry(cause: Cause) -> Self {
        Attempt::Retry { cause, after: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_removes_every_query_string() {
        let text = "GET http://h/b/k?X-Amz-Signature=abc (then http://h/x?y=1 ok)";
        assert_eq!(redact(text), "GET http://h/b/k (then http://h/x ok)");
    }

    #[test]
    fn redact_url_keeps_scheme_host_and_path() {
        assert_eq!(
            redact_url("https://h:9000/b/k?sig=1#f"),
            "https://h:9000/b/k"
        );
        assert_eq!(redact_url("http://h/b/k"), "http://h/b/k");
    }
}
