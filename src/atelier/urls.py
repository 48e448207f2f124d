"""Is a URL that a caller gave (an input image, a webhook, an upload prefix) one this server can call?

Checked when the request arrives, so that a URL no client library can parse (``http://[::1/``, a port of
``99999``, no host) is a 4xx naming its field, never a 500 from the parser, nor a webhook task that
crashes later. Where a URL may point is a separate question (``atelier.fetch``), asked when it is used.
"""

from __future__ import annotations

import re
import urllib.parse

import httpx

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?", re.IGNORECASE)


def http_url_problem(url: str) -> str | None:
    """Why ``url`` is not an absolute http(s) URL that can be requested, or None when it is."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - parsing it raises for a port that is not a number from 0 to 65535
        httpx.URL(url)  # what the webhook senders and the fetcher parse it with
    except (ValueError, httpx.InvalidURL) as exc:
        return str(exc) or type(exc).__name__
    if parts.scheme.lower() not in ("http", "https"):
        return "it is not an http:// or https:// URL"
    if not parts.hostname:
        return "it has no host"
    host = httpx.URL(url).raw_host.decode("ascii", "replace")  # a name in IDNA form, or an IP address
    if ":" not in host and not _HOST_NAME.fullmatch(host):
        return f"its host {host[:60]!r} is not a host name (letters, digits, '-' and '.') or an IP address"
    return None
