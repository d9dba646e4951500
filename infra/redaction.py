"""Secrets inside URLs, stripped from everything the project stores, prints or logs.

A URL can carry credentials in two places: its userinfo (``scheme://user:password@host/…``) and its query or
fragment parameters (presigned S3 ``X-Amz-Signature`` / ``X-Amz-Credential`` / ``X-Amz-Security-Token``, GCS
``X-Goog-Signature``, Azure SAS ``sig``, CloudFront ``Signature`` / ``Key-Pair-Id``, generic ``token`` /
``access_token`` / ``api_key``…). :func:`redact_url` drops the userinfo and replaces the value of every secret-named
parameter by ``<redacted>``; :func:`redact_text` does the same to every URL inside a free-text message (a log line,
an error message, a JSON document). Both are idempotent.

The redacted form is for storing and showing only: a job keeps the working URL, credentials included, in memory.
:class:`RedactingFilter` applies :func:`redact_text` to every log record (message, traceback, stack) that passes
through the handler it is attached to; the CLI attaches it to its handlers.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote

REDACTED = "<redacted>"

# scheme://userinfo@ — greedy up to the last '@' before the path, query or fragment (a raw '@' in a password too);
# or user:password@ whose password holds a raw '/' (half of AWS secret keys do), up to the last '@' before the
# query or fragment: a path '@' after a "host:port/" is then taken too, which only over-redacts
_USERINFO = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]*://)"
                       r"(?:[^/?#\s'\"<>]*@|[^/?#\s'\"<>:@]*:[^?#\s'\"<>]*@)")
# ?name=value, &name=value, #name=value (a fragment: OAuth's #access_token=…)
_PARAM = re.compile(r"([?&#])([^=&#?\s'\"<>]+)=([^&#\s'\"]*)")
# parameter names (lower case, '-' and '_' removed) that hold a secret, by substring or exactly
_SECRET_WORDS = ("signature", "token", "credential", "secret", "password", "passwd", "accesskey", "accessid",
                 "keypairid", "apikey", "session", "privatekey", "clientkey")
_SECRET_NAMES = frozenset({"sig", "key", "pwd", "pass", "auth", "authorization", "policy", "code"})


def is_secret_param(name: str) -> bool:
    """Whether a query (or fragment) parameter called ``name`` carries a secret (``X-Amz-Signature``: yes)."""
    norm = re.sub(r"[^a-z0-9]", "", unquote(name).lower())
    return norm in _SECRET_NAMES or any(word in norm for word in _SECRET_WORDS)


def _param(match: re.Match[str]) -> str:
    sep, name, _ = match.groups()
    return f"{sep}{name}={REDACTED}" if is_secret_param(name) else match[0]


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted: userinfo dropped, secret-named parameter values ``<redacted>``.

    Args:
        text: any string: a URL, a log message, an error message, a JSON or YAML document.

    Returns:
        The same text, unchanged where it holds no URL secret.
    """
    return _PARAM.sub(_param, _USERINFO.sub(r"\1", text))


def redact_url(url: str) -> str:
    """The form of ``url`` that may be stored or shown: no userinfo, secret-named parameters ``<redacted>``.

    ``s3://AKIA…:secret@bucket/x.pth`` → ``s3://bucket/x.pth``; ``https://h/x?X-Amz-Signature=abc&part=1`` →
    ``https://h/x?X-Amz-Signature=<redacted>&part=1``. URLs without a secret come back unchanged.
    """
    return redact_text(str(url))


def has_secret(text: str) -> bool:
    """Whether ``text`` holds a URL secret that :func:`redact_text` would remove."""
    return redact_text(text) != text


class RedactingFilter(logging.Filter):
    """A handler filter that redacts URL secrets in each record's message, traceback text and stack text.

    The record is changed in place (``msg`` becomes the redacted message, ``args`` empty), so every handler that
    sees it after this one sees the redacted form. Records are never dropped.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record``; always True."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: leave it to logging's own error report
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def install_log_redaction(loggers: tuple[str, ...] = ("", "ray")) -> None:
    """Redact every log record of this process when it is made, and attach one :class:`RedactingFilter` to every
    handler of ``loggers`` (the root logger by default, and Ray's) and of their existing child loggers.

    The record factory covers the handlers a library adds later (Ray configures some of its loggers, each with its
    own non-propagating handler, only when a subsystem starts); the handler filters stay for records made by a
    factory installed after this one. Idempotent."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "tec_redacting", False):
        logging.setLogRecordFactory(_redacting_factory(factory))
    known = list(logging.root.manager.loggerDict)
    names = {n for n in loggers} | {k for k in known for n in loggers if n and k.startswith(n + ".")}
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())


def _redacting_factory(base: Any) -> Any:
    """``base`` (a log record factory) whose records are redacted as :class:`RedactingFilter` redacts them."""
    redact = RedactingFilter()

    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        redact.filter(record)
        return record

    make.tec_redacting = True  # type: ignore[attr-defined]
    return make
