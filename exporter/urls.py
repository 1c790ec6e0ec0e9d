"""Node URLs: which configured URLs name the same server."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

_LOOPBACK = "localhost"
_DEFAULT_PORTS = {"http": 80, "https": 443}


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
    shown = _LOOPBACK if loopback else f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}{parts.path.rstrip('/')}"
