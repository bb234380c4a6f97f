//! What Python hands to `fetch`, checked once up front and turned into plain Rust values.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Uri};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::client::Trust;
use crate::digest::PartAlgorithm;
use crate::error::redact_url;
use crate::whole::{Algorithm, WholeSpec};

/// One part as Python passes it: `(index, offset, length, digest hex | None)`, optionally followed by
/// `kept`, the bytes at the part's start already on disk from an earlier run, then by `lead` and
/// `trail`, the bytes just before and after the part that its request asks for too (and discards).
#[derive(FromPyObject)]
enum PartArg {
    Window((usize, u64, u64, Option<String>, u64, u64, u64)),
    Kept((usize, u64, u64, Option<String>, u64)),
    Plain((usize, u64, u64, Option<String>)),
}

/// One blob as Python passes it: a dict with keys `url`, `headers`, `path`, `size`, `parts`, and
/// optionally `part_digest` (what the parts' digests are: "sha256", the default, or "blake3"), `whole`
/// (`(algorithm, hex digest)` the blob must hash to) and `record` (report the sha256 of every part
/// fetched without an expected digest).
pub struct JobArg {
    url: String,
    headers: Option<HashMap<String, String>>,
    path: PathBuf,
    size: u64,
    parts: Vec<PartArg>,
    part_digest: Option<String>,
    whole: Option<(String, String)>,
    record: bool,
}

impl<'py> FromPyObject<'py> for JobArg {
    fn extract_bound(ob: &Bound<'py, PyAny>) -> PyResult<Self> {
        let dict = ob.downcast::<PyDict>()?;
        let required = |key: &str| {
            dict.get_item(key)?
                .ok_or_else(|| PyValueError::new_err(format!("job is missing {key:?}")))
        };
        let optional = |key: &str| -> PyResult<Option<Bound<'py, PyAny>>> {
            Ok(dict.get_item(key)?.filter(|v| !v.is_none()))
        };
        Ok(JobArg {
            url: required("url")?.extract()?,
            headers: optional("headers")?.map(|v| v.extract()).transpose()?,
            path: required("path")?.extract()?,
            size: required("size")?.extract()?,
            parts: required("parts")?.extract()?,
            part_digest: optional("part_digest")?.map(|v| v.extract()).transpose()?,
            whole: optional("whole")?.map(|v| v.extract()).transpose()?,
            record: optional("record")?.map_or(Ok(false), |v| v.extract())?,
        })
    }
}

/// One blob, ready to fetch. Its file is opened only while a part is being written (so a model of
/// thousands of files never holds more than `concurrency` of them open); it is never created or
/// truncated here: Python preallocated it.
pub struct Job {
    pub uri: Uri,
    pub shown_url: String,
    pub headers: HeaderMap,
    pub path: PathBuf,
    pub size: u64,
    pub parts: Vec<PartSpec>,
    /// What each part's `digest` is.
    pub part_digest: PartAlgorithm,
    pub whole: Option<WholeSpec>,
    pub record: bool,
}

/// One byte range of a blob: `index` is the caller's own part number, echoed back in progress;
/// `kept` leading bytes are already on disk and are re-checked, not fetched again. A part with a
/// window (`lead` bytes before it, `trail` after it, asked for and discarded) is a request of its own:
/// a repair makes its reads of one part differ in shape so that a hop that damages requests the same
/// way each time cannot make two of them agree.
pub struct PartSpec {
    pub index: usize,
    pub offset: u64,
    pub length: u64,
    pub digest: Option<[u8; 32]>,
    pub kept: u64,
    pub lead: u64,
    pub trail: u64,
}

impl PartSpec {
    pub fn windowed(&self) -> bool {
        self.lead > 0 || self.trail > 0
    }
}

/// The transfer limits, validated.
#[derive(Clone)]
pub struct Options {
    pub concurrency: usize,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub progress_interval: Duration,
    /// Bytes/s a body must average over each `rate_window` (0: no rule); see `deadline.rs`.
    pub min_rate: f64,
    pub rate_window: Duration,
    /// Retries of a part whose attempts timed out or ran below the minimum rate.
    pub stall_retries: u32,
    /// Which CAs an https server's certificate must chain to.
    pub trust: Trust,
}

impl Options {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        concurrency: usize,
        connect_timeout: f64,
        read_timeout: f64,
        max_retries: u32,
        backoff_base: f64,
        backoff_max: f64,
        progress_interval: f64,
    ) -> PyResult<Self> {
        if concurrency == 0 {
            return Err(PyValueError::new_err("concurrency must be at least 1"));
        }
        Ok(Options {
            concurrency,
            connect_timeout: seconds("connect_timeout", connect_timeout, false)?,
            read_timeout: seconds("read_timeout", read_timeout, false)?,
            max_retries,
            backoff_base: seconds("backoff_base", backoff_base, true)?,
            backoff_max: seconds("backoff_max", backoff_max, true)?,
            progress_interval: seconds("progress_interval", progress_interval, false)?,
            min_rate: 0.0,
            rate_window: Duration::from_secs(20),
            stall_retries: max_retries,
            trust: Trust::default(),
        })
    }

    /// The CA file and folder Python resolved (`agent.settings.Trust`); neither: the system store.
    pub fn with_trust(mut self, ca_file: Option<PathBuf>, ca_dir: Option<PathBuf>) -> Self {
        self.trust = Trust { ca_file, ca_dir };
        self
    }

    /// The minimum-rate rule and the retries left to a part that keeps timing out.
    pub fn with_deadlines(
        mut self,
        min_rate: f64,
        rate_window: f64,
        stall_retries: u32,
    ) -> PyResult<Self> {
        if !(min_rate.is_finite() && min_rate >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "min_rate must be a number of bytes/s >= 0, got {min_rate}"
            )));
        }
        self.min_rate = min_rate;
        self.rate_window = seconds("rate_window", rate_window, false)?;
        self.stall_retries = stall_retries;
        Ok(self)
    }
}

fn seconds(name: &str, value: f64, zero_ok: bool) -> PyResult<Duration> {
    let valid = value.is_finite() && (value > 0.0 || zero_ok && value == 0.0);
    match Duration::try_from_secs_f64(value) {
        Ok(d) if valid => Ok(d),
        _ => Err(PyValueError::new_err(format!(
            "{name} must be a positive number of seconds, got {value}"
        ))),
    }
}

impl JobArg {
    /// The checked job, or a ValueError naming the file (never the URL's query).
    pub fn into_job(self) -> PyResult<Job> {
        let shown_url = redact_url(&self.url);
        let bad = |what: String| PyValueError::new_err(format!("{}: {what}", self.path.display()));
        let uri: Uri = self
            .url
            .parse()
            .map_err(|_| bad(format!("not a valid URL: {shown_url}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(bad(format!("not an http(s) URL: {shown_url}")));
        }
        let headers = header_map(self.headers.unwrap_or_default()).map_err(bad)?;
        let part_digest = match self.part_digest.as_deref() {
            None => PartAlgorithm::Sha256,
            Some(name) => PartAlgorithm::parse(name)
                .ok_or_else(|| bad(format!("unknown part digest {name:?}")))?,
        };
        let mut parts = self
            .parts
            .into_iter()
            .map(|arg| {
                let (index, offset, length, sha, kept, lead, trail) = match arg {
                    PartArg::Window(t) => t,
                    PartArg::Kept((i, o, l, s, k)) => (i, o, l, s, k, 0, 0),
                    PartArg::Plain((i, o, l, s)) => (i, o, l, s, 0, 0, 0),
                };
                let part = part_spec(index, offset, length, sha, kept, self.size)?;
                with_window(part, lead, trail, self.size)
            })
            .collect::<Result<Vec<_>, String>>()
            .map_err(&bad)?;
        // File order: the whole-blob hash follows the transfer, and overlaps are refused.
        parts.sort_by_key(|p| p.offset);
        if let Some(w) = parts
            .windows(2)
            .find(|w| w[0].offset + w[0].length > w[1].offset)
        {
            return Err(bad(format!(
                "parts {} and {} overlap",
                w[0].index, w[1].index
            )));
        }
        let whole = self.whole.map(whole_spec).transpose().map_err(&bad)?;
        Ok(Job {
            uri,
            shown_url,
            headers,
            path: self.path,
            size: self.size,
            parts,
            part_digest,
            whole,
            record: self.record,
        })
    }
}

fn header_map(headers: HashMap<String, String>) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let key = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let value = HeaderValue::from_str(&value)
            .map_err(|_| format!("invalid value for header {name}"))?;
        map.insert(key, value);
    }
    Ok(map)
}

fn part_spec(
    index: usize,
    offset: u64,
    length: u64,
    digest: Option<String>,
    kept: u64,
    size: u64,
) -> Result<PartSpec, String> {
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(format!(
            "part {index} (bytes {offset}+{length}) lies outside the blob of {size} bytes"
        ));
    }
    if kept > length {
        return Err(format!(
            "part {index}: {kept} kept bytes exceed its {length}"
        ));
    }
    let digest = digest
        .map(|hex| parse_sha256(&hex).ok_or(format!("part {index}: bad digest {hex:?}")))
        .transpose()?;
    Ok(PartSpec {
        index,
        offset,
        length,
        digest,
        kept,
        lead: 0,
        trail: 0,
    })
}

fn with_window(part: PartSpec, lead: u64, trail: u64, size: u64) -> Result<PartSpec, String> {
    let end = part.offset + part.length;
    if lead > part.offset || end.checked_add(trail).is_none_or(|e| e > size) {
        return Err(format!(
            "part {}: its window ({lead} bytes before, {trail} after) leaves the blob of {size} bytes",
            part.index
        ));
    }
    Ok(PartSpec {
        lead,
        trail,
        ..part
    })
}

fn whole_spec((algorithm, hex): (String, String)) -> Result<WholeSpec, String> {
    let algorithm =
        Algorithm::parse(&algorithm).ok_or(format!("unknown whole-blob hash {algorithm:?}"))?;
    let expected = parse_hex(&hex).ok_or(format!("bad whole-blob digest {hex:?}"))?;
    let want = if algorithm == Algorithm::Sha256 {
        32
    } else {
        20
    };
    if expected.len() != want {
        return Err(format!("whole-blob digest {hex:?} has the wrong length"));
    }
    Ok(WholeSpec {
        algorithm,
        expected,
    })
}

/// 64 hex digits to 32 bytes (a sha256 or BLAKE3 digest), or None.
pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    parse_hex(hex)?.try_into().ok()
}

/// An even number of hex digits to bytes, or None.
pub fn parse_hex(hex: &str) -> Option<Vec<u8>> {
    let bytes = hex.as_bytes();
    if !bytes.len().is_multiple_of(2) || !bytes.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_round_trips() {
        let hex = "00ff".repeat(16);
        let bytes = parse_sha256(&hex).unwrap();
        assert_eq!(to_hex(&bytes), hex);
        assert!(parse_sha256("zz").is_none());
        assert!(parse_sha256(&"g".repeat(64)).is_none());
    }

    #[test]
    fn part_outside_the_blob_is_refused() {
        assert!(part_spec(0, 10, 5, None, 0, 12).is_err());
        assert!(part_spec(0, u64::MAX, 5, None, 0, 12).is_err());
        assert!(part_spec(0, 7, 5, None, 0, 12).is_ok());
        assert!(part_spec(0, 7, 5, None, 6, 12).is_err());
    }

    #[test]
    fn a_window_must_stay_inside_the_blob() {
        let part = || part_spec(0, 4, 4, None, 0, 12).unwrap();
        assert!(with_window(part(), 4, 4, 12).is_ok());
        assert!(with_window(part(), 5, 0, 12).is_err());
        assert!(with_window(part(), 0, 5, 12).is_err());
        assert!(with_window(part(), 0, u64::MAX, 12).is_err());
        assert!(with_window(part(), 1, 1, 12).unwrap().windowed());
        assert!(!with_window(part(), 0, 0, 12).unwrap().windowed());
    }
}
