//! Reading a response head: is it the range we asked for, a whole object, or a retry signal?
use std::time::Duration;

use hyper::header::{CONTENT_RANGE, RETRY_AFTER};
use hyper::http::response::Parts;
use hyper::StatusCode;

use crate::error::{Attempt, Cause};
use crate::policy::is_retryable;

/// How many leading body bytes to discard so that the body begins at byte `start`.
///
/// 206, and 200 with a Content-Range (rclone serve s3 does that), must carry exactly the asked range;
/// a 200 without one is the whole object. The policy's statuses (408, 429, 5xx) are retried; any
/// other status is fatal.
pub fn body_skip(head: &Parts, start: u64, end: u64) -> Result<u64, Attempt> {
    let status = head.status;
    if status == StatusCode::PARTIAL_CONTENT || status == StatusCode::OK {
        return match content_range(head) {
            None if status == StatusCode::OK => Ok(start),
            None => Ok(0),
            Some(Some((first, last))) if (first, last) == (start, end) => Ok(0),
            Some(Some((first, last))) => Err(Attempt::retry(Cause::Transport(format!(
                "server sent bytes {first}-{last} for a request of {start}-{end}"
            )))),
            Some(None) => Err(Attempt::retry(Cause::Transport(
                "unreadable Content-Range header".into(),
            ))),
        };
    }
    let cause = Cause::Status(status.as_u16());
    if is_retryable(status.as_u16()) {
        Err(Attempt::Retry {
            cause,
            after: retry_after(head),
        })
    } else {
        Err(Attempt::Fatal(cause))
    }
}

/// `None` without the header; `Some(None)` when it is present but not `bytes a-b/total`.
fn content_range(head: &Parts) -> Option<Option<(u64, u64)>> {
    let value = head.headers.get(CONTENT_RANGE)?;
    Some(value.to_str().ok().and_then(parse_content_range))
}

fn parse_content_range(value: &str) -> Option<(u64, u64)> {
    let range = value.trim().strip_prefix("bytes ")?;
    let (span, _total) = range.split_once('/')?;
    let (first, last) = span.split_once('-')?;
    Some((first.trim().parse().ok()?, last.trim().parse().ok()?))
}

/// `Retry-After` in delta-seconds; an HTTP-date is ignored (the jittered backoff applies instead).
fn retry_after(head: &Parts) -> Option<Duration> {
    let text = head.headers.get(RETRY_AFTER)?.to_str().ok()?;
    text.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Response;

    fn head(status: u16, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Response::builder().status(status);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn partial_content_must_match_the_asked_range() {
        assert_eq!(
            body_skip(&head(206, &[("content-range", "bytes 10-19/100")]), 10, 19).ok(),
            Some(0)
        );
        assert!(body_skip(&head(206, &[("content-range", "bytes 0-99/100")]), 10, 19).is_err());
        assert_eq!(body_skip(&head(206, &[]), 10, 19).ok(), Some(0));
    }

    #[test]
    fn ok_with_content_range_is_the_range_and_without_is_the_whole_object() {
        assert_eq!(
            body_skip(&head(200, &[("content-range", "bytes 10-19/*")]), 10, 19).ok(),
            Some(0)
        );
        assert_eq!(body_skip(&head(200, &[]), 10, 19).ok(), Some(10));
    }

    #[test]
    fn retryable_statuses_carry_retry_after() {
        match body_skip(&head(503, &[("retry-after", "3")]), 0, 9) {
            Err(Attempt::Retry { after, .. }) => assert_eq!(after, Some(Duration::from_secs(3))),
            _ => panic!("503 must be retried"),
        }
        for status in [408, 429, 500, 502] {
            assert!(matches!(
                body_skip(&head(status, &[]), 0, 9),
                Err(Attempt::Retry { .. })
            ));
        }
        for status in [400, 403, 404, 416] {
            assert!(matches!(
                body_skip(&head(status, &[]), 0, 9),
                Err(Attempt::Fatal(_))
            ));
        }
    }
}
