"""Keeping credentials out of text: a presigned URL's query string is its signature."""

from __future__ import annotations

import logging
import re
from typing import Final

_QUERY_IN_TEXT = re.compile(r"\?[^\s'\")]*")


def scrub_queries(text: str, replacement: str = "?<redacted>") -> str:
    """Every query string inside `text` (an error message naming a presigned URL) replaced."""
    return _QUERY_IN_TEXT.sub(replacement, text)


def redact_url(url: str) -> str:
    """The URL without its query string, safe for logs."""
    return url.split("?", 1)[0]


# Third-party DEBUG records that carry a SigV4 signature: botocore logs every signature it computes (with the
# canonical request, enough to rebuild a presigned URL) and the Authorization header it sends; urllib3 logs
# each request line, query string included. Our own records only ever hold `redact_url(url)`.
SIGNING_LOGGERS: Final = ("botocore.auth", "botocore.endpoint", "urllib3.connectionpool")
_SIGNATURE = re.compile(r"(Signature(?:=|:\s*))[0-9a-fA-F]{16,}")


class RedactSignatures(logging.Filter):
    """Rewrites a record's message with every signature value replaced by `<redacted>`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed third-party record: leave it to logging's own error path
            return True
        redacted = _SIGNATURE.sub(r"\1<redacted>", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_REDACTOR = RedactSignatures()


def redact_signing_logs() -> None:
    """Attach the redaction filter to the loggers that would print signatures (idempotent)."""
    for name in SIGNING_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACTOR not in logger.filters:
            logger.addFilter(_REDACTOR)
