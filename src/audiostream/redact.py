"""Secret redaction for anything printed or logged: URL passwords, API keys, tokens.

The CLI passes every URL it prints, and every error message, through ``redact_text``:
a broker URL such as ``amqp://user:pass@host/`` appears in exception texts and in
command output, and a terminal, a CI log or a bug report is not a place for it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["MASK", "redact_text", "redact_url"]

MASK = "***"

#: ``scheme://user:password@`` in free text; the password is everything up to the last
#: ``@`` before the host (passwords may contain ``:`` but RFC 3986 forbids a raw ``@``).
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)(?P<pw>[^\s/@]+)(?=@)")
#: Query parameters whose value is a credential.
_SECRET_PARAMS = frozenset({"api_key", "apikey", "key", "token", "access_token", "password",
                            "secret", "resume_token"})
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&](?:" + "|".join(sorted(_SECRET_PARAMS)) + r")=)(?P<value>[^&#\s]+)",
    re.IGNORECASE,
)
#: An audiostream API key: ``as_<id>_<secret>``; the id is public, the secret is not.
_API_KEY = re.compile(r"\b(?P<head>as_[0-9a-f]{12}_)(?P<secret>[A-Za-z0-9-]{8,})")


def redact_url(url: str) -> str:
    """``url`` with its password and credential query parameters replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in _SECRET_PARAMS else v)
                               for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Free text (an error message, a log line) with every secret it contains masked."""
    text = _USERINFO.sub(lambda m: m["head"] + MASK, text)
    text = _QUERY_SECRET.sub(lambda m: m["head"] + MASK, text)
    return _API_KEY.sub(lambda m: m["head"] + MASK, text)
