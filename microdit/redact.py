"""Keep credentials in URLs out of logs: one redaction function and the hook that applies it to every log line.

    from microdit.redact import install_log_redaction, redact
    redact("https://cdn/x.tar?Policy=..&Signature=..&Key-Pair-Id=..")       # 'https://cdn/x.tar?<redacted>'
    redact("download https://cdn/x.tar?sig=abc failed")                      # any text: every URL in it
    install_log_redaction()       # from here on, every log record of this process is redacted

Signed CDN links (CloudFront `Policy`/`Signature`/`Key-Pair-Id`, S3 `X-Amz-*`, Azure `sig`) carry their
credentials in the query string, and a logged link is a leaked link (Prefect keeps flow-run logs on its
server). `redact` removes the query string and fragment of every URL in a text, and credential-looking
`key=value` pairs outside URLs. `install_log_redaction` wraps the logging record factory, so records of
every logger (our own, Prefect's run loggers, libraries') are redacted when created, exception text
included; command-line errors go through `microdit.cli.run_cli`, which redacts too.
"""
from __future__ import annotations

import logging
import re
import traceback

MARK = "<redacted>"
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s?#'\"<>]*)([?#][^\s'\"<>]*)")
_SECRET_PARAM = re.compile(
    r"(?i)\b(Policy|Signature|Key-Pair-Id|X-Amz-[A-Za-z-]+|sig|token|access_token|api_key)=[^\s&'\"<>]+")


def redact(text: object) -> str:
    """`text` with every URL's query string and fragment replaced by a marker, and credential-looking
    `key=value` pairs (Policy, Signature, Key-Pair-Id, X-Amz-*, sig, token) with their values removed."""
    s = _URL.sub(lambda m: f"{m.group(1)}?{MARK}", str(text))
    return _SECRET_PARAM.sub(lambda m: f"{m.group(1)}={MARK}", s)


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    try:
        message = record.getMessage()
    except Exception:                          # a malformed format string: leave it to logging to report
        return record
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, ()
    if record.exc_info and not record.exc_text:
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    return record


_installed = False


def install_log_redaction() -> None:
    """Redact every log record this process creates from now on (idempotent)."""
    global _installed
    if _installed:
        return
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs):
        return _redact_record(make(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    _installed = True
