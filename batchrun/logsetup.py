"""Logging for the CLI, with secrets scrubbed from every record.

httpx logs each request's full URL at INFO, and a presigned URL's query string
is a credential: every record passes through `RedactingFilter` before any
handler formats it, whatever logger it came from.
"""

from __future__ import annotations

import logging
import re

# A URL's query string is dropped whole: on a presigned URL it is the credential.
_URL_QUERY = re.compile(r"(https?://[^\s?#'\"<>]+)\?[^\s'\"<>]*")
# Signature-like parameters outside a URL (a bare query string in a message).
_SIGNED_PARAM = re.compile(
    r"(?i)\b(?:sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token"
    r"|x-goog-signature)=[^&\s'\"]*"
)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    text = _URL_QUERY.sub(r"\1?<redacted>", text)
    text = _SIGNED_PARAM.sub("<redacted>", text)
    return _BEARER.sub(r"\1<redacted>", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True


def configure(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level.upper() != "DEBUG":
        # httpx and uvicorn narrate every request at INFO: noise for a person.
        for name in ("httpx", "httpcore", "uvicorn", "uvicorn.access", "uvicorn.error"):
            logging.getLogger(name).setLevel(logging.WARNING)
