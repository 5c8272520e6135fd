"""The one URL redactor: every message, log line, tag, attr and JSON field that may hold a
URL goes through it, so a password in a storage URL or a tracking URI never leaves the
process.

A URL keeps its scheme, user name, host, port, path and harmless query parameters; the
password of its user info and the values of password-like query parameters become `***`.
Plain `urllib.parse`, no other import: the CLI loads it at start.
"""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit

MASK = "***"
# Query parameters whose value is a secret (compared lower-case; also any name containing
# one of SECRET_WORDS).
SECRET_PARAMS = frozenset({
    "password", "passwd", "pwd", "pass", "secret", "token", "access_token", "refresh_token",
    "id_token", "api_key", "apikey", "key", "sslpassword", "sslkey", "auth", "authorization",
    "credential", "credentials", "signature", "sig", "sas", "client_secret",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token"})
SECRET_WORDS = ("password", "secret", "token", "credential", "passwd", "apikey", "api_key")
# A URL inside free text: scheme://, then anything up to whitespace or a quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


def is_secret_param(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_PARAMS or any(word in lowered for word in SECRET_WORDS)


def redact_url(url: str) -> str:
    """`url` with its password and secret query values masked: for messages.

    >>> redact_url("postgresql://alice:s3cret@db:5432/optuna?sslmode=require&password=x")
    'postgresql://alice:***@db:5432/optuna?sslmode=require&password=***'
    """
    return _rebuild(url, keep_user=True)


def without_credentials(url: str) -> str:
    """`url` with its user info dropped and secret query values masked: for links shown to
    people (a browser asks for credentials itself).

    >>> without_credentials("http://alice:s3cret@mlflow:5000/#/experiments/1")
    'http://mlflow:5000/#/experiments/1'
    """
    return _rebuild(url, keep_user=False)


def _rebuild(url: str, *, keep_user: bool) -> str:
    """The URL, split as `urllib.parse.urlsplit` does, with only its user info and query
    rewritten: everything else stays byte for byte (`sqlite:///x.db` keeps its three
    slashes)."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable (a broken IPv6 host...): mask all after the scheme
        return url.split("://", 1)[0] + "://" + MASK
    scheme, rest = url.split("://", 1)
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
              default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        if not keep_user:
            netloc = host
        elif has_password:
            netloc = f"{user}:{MASK}@{host}"
    if parts.query:
        query = _redact_query(parts.query)
        if query != parts.query:
            tail = tail.replace(f"?{parts.query}", f"?{query}", 1)
    return f"{scheme}://{netloc}{tail}"


def redact_text(text: str) -> str:
    """Every URL in free text (an exception's message, a log line) redacted.

    >>> redact_text("cannot open postgresql://bob:hunter2@db/optuna: refused")
    'cannot open postgresql://bob:***@db/optuna: refused'
    """
    if "://" not in text:
        return text
    def one(match: re.Match[str]) -> str:
        url = match.group(0)
        trimmed = url.rstrip(".,;:!?)]}")  # the sentence's punctuation, not the URL's
        return redact_url(trimmed) + url[len(trimmed):]

    return _URL_IN_TEXT.sub(one, text)


def _redact_query(query: str) -> str:
    """Values of secret parameters masked; the rest kept byte for byte."""
    if not query:
        return query
    pieces = []
    for piece in query.split("&"):
        name, sep, _ = piece.partition("=")
        pieces.append(f"{name}={MASK}" if sep and is_secret_param(name) else piece)
    return "&".join(pieces)


class RedactingFilter(logging.Filter):
    """A handler filter: the formatted message of every record, URLs redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is the library's; leave it alone
            return True
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            # A traceback's last line repeats the exception message: format it redacted.
            record.exc_text = redact_text(logging.Formatter().formatException(
                record.exc_info))
        return True


def install_log_filter() -> None:
    """Redact every log line that reaches a handler of the root logger (and Python's
    last-resort handler, which prints warnings when no handler is configured)."""
    handlers = [*logging.getLogger().handlers]
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
