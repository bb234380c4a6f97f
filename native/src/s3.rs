//! The pull's S3 control plane without botocore: SigV4 presigned URLs for GET and ListObjectsV2, and
//! the listing's XML parsed, by rusty-s3 (sans-IO). Python sends the few small requests itself; the
//! bytes of blobs go through [`crate::fetch`] with URLs signed here.
// pyo3 0.22's `#[pyfunction]` expansion trips `useless_conversion` on the PyResult return type.
#![allow(clippy::useless_conversion)]
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rusty_s3::actions::ListObjectsV2;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use url::Url;

/// Where to sign for: one bucket on one endpoint, path-style (MinIO's default), with optional keys.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct Target {
    endpoint: String,
    region: String,
    bucket: String,
    access_key: Option<String>,
    secret_key: Option<String>,
}

impl Target {
    fn bucket(&self) -> PyResult<Bucket> {
        let endpoint = Url::parse(&self.endpoint)
            .map_err(|e| PyValueError::new_err(format!("bad endpoint URL: {e}")))?;
        Bucket::new(
            endpoint,
            UrlStyle::Path,
            self.bucket.clone(),
            self.region.clone(),
        )
        .map_err(|e| PyValueError::new_err(format!("cannot address bucket {:?}: {e}", self.bucket)))
    }

    fn credentials(&self) -> Option<Credentials> {
        match (&self.access_key, &self.secret_key) {
            (Some(key), Some(secret)) => Some(Credentials::new(key, secret)),
            _ => None, // anonymous: unsigned URLs
        }
    }
}

/// A presigned GET of `key`, valid for `expires` seconds. Its query string is a credential.
#[pyfunction]
pub fn presign_get(target: Target, key: &str, expires: u64) -> PyResult<String> {
    let bucket = target.bucket()?;
    let credentials = target.credentials();
    let action = bucket.get_object(credentials.as_ref(), key);
    Ok(action.sign(Duration::from_secs(expires)).into())
}

/// A presigned ListObjectsV2 of `prefix` (with `delimiter` and `continuation` when given).
#[pyfunction]
#[pyo3(signature = (target, prefix, *, delimiter = None, continuation = None, expires = 300))]
pub fn presign_list(
    target: Target,
    prefix: &str,
    delimiter: Option<&str>,
    continuation: Option<&str>,
    expires: u64,
) -> PyResult<String> {
    let bucket = target.bucket()?;
    let credentials = target.credentials();
    let mut action = bucket.list_objects_v2(credentials.as_ref());
    action.with_prefix(prefix);
    if let Some(delimiter) = delimiter {
        action.with_delimiter(delimiter);
    }
    if let Some(token) = continuation {
        action.with_continuation_token(token);
    }
    Ok(action.sign(Duration::from_secs(expires)).into())
}

/// One page of a listing: `([(key, size, etag)], [common prefix], next continuation token | None)`.
type Page = (Vec<(String, u64, String)>, Vec<String>, Option<String>);

/// Parses a ListObjectsV2 response body; a ValueError for anything that is not one, whole.
#[pyfunction]
pub fn parse_list(body: &str) -> PyResult<Page> {
    whole_page(body)
        .map_err(|why| PyValueError::new_err(format!("not a ListObjectsV2 response: {why}")))
}

/// A listing has no checksum, so its bytes are the only sign of a body cut short, and the XML reader
/// stops at the end of input without complaint: half a page parses as a shorter page, its last object
/// without a size. So the root element must be closed and every object must carry its size.
fn whole_page(body: &str) -> Result<Page, String> {
    if !body.trim_end().ends_with("</ListBucketResult>") {
        return Err("cut short (no closing </ListBucketResult>)".to_owned());
    }
    let page = ListObjectsV2::parse_response(body).map_err(|e| e.to_string())?;
    let objects = page
        .contents
        .into_iter()
        .map(|o| {
            let etag = o.etag.unwrap_or_default().trim_matches('"').to_owned();
            let size = o
                .size
                .ok_or_else(|| format!("object {:?} without its size", o.key))?;
            Ok((o.key, size, etag))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let prefixes = page.common_prefixes.into_iter().map(|p| p.prefix).collect();
    Ok((objects, prefixes, page.next_continuation_token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_page_parses_with_its_continuation() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>m/</Prefix>
<KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>true</IsTruncated>
<Contents><Key>m/a</Key><LastModified>2026-01-01T00:00:00Z</LastModified><ETag>"abc"</ETag>
<Size>42</Size><StorageClass>STANDARD</StorageClass></Contents>
<NextContinuationToken>tok</NextContinuationToken></ListBucketResult>"#;
        let (objects, prefixes, next) = parse_list(body).unwrap();
        assert_eq!(objects, vec![("m/a".to_owned(), 42, "abc".to_owned())]);
        assert!(prefixes.is_empty());
        assert_eq!(next.as_deref(), Some("tok"));
    }

    const TWO: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>m/</Prefix>
<KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>
<Contents><Key>m/a</Key><ETag>"abc"</ETag><Size>42</Size></Contents>
<Contents><Key>m/b</Key><ETag>"def"</ETag><Size>7</Size></Contents></ListBucketResult>
"#;

    #[test]
    fn a_listing_cut_anywhere_is_refused_never_read_as_a_shorter_page() {
        assert_eq!(whole_page(TWO).unwrap().0.len(), 2);
        for cut in 1..TWO.trim_end().len() {
            let page = whole_page(&TWO[..cut]);
            assert!(page.is_err(), "a body cut at {cut} parsed: {page:?}");
        }
    }

    #[test]
    fn an_object_without_its_size_is_refused() {
        let body = TWO.replace("<Size>7</Size>", "");
        let err = whole_page(&body).unwrap_err();
        assert!(err.contains("without its size"), "{err}");
    }
}
