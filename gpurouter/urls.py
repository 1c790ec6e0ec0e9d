"""Node URLs: which configured URLs name the same server, and how a URL is shown without its credentials."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

_LOOPBACK = "localhost"
_DEFAULT_PORTS = {"http": 80, "https": 443}
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s?#]+@")
REDACTED = "***"


def redact(text: str) -> str:
    """`text` (a URL, or a message that contains URLs) with the user and password of every URL replaced by
    `***`: `http://ops:s3cret@gpu1:11434` is shown as `http://***@gpu1:11434`. Connections keep the
    credentials; everything that shows a URL (metrics, API, status page, command output, logs) uses this."""
    return _USERINFO.sub(rf"\1{REDACTED}@", text)


def identity(url: str) -> str:
    """The server a URL reaches, for comparing: scheme and host in lower case, the default port made explicit,
    an IP literal in its short form, localhost / 127.0.0.1 / ::1 as one loopback, without user or password,
    and the path without its trailing slash. `HTTP://Box:80/` and `http://box` give the same text."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        loopback = host == _LOOPBACK
    else:
        host = str(address)
        loopback = str(address) in ("127.0.0.1", "::1")
    port = parts.port or _DEFAULT_PORTS.get(scheme, 0)
    return f"{scheme}://{authority(_LOOPBACK if loopback else host, port)}{parts.path.rstrip('/')}"


def authority(host: str, port: int) -> str:
    """`127.0.0.1:9877`, `[::1]:9877`: a host and port as a URL writes them."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
