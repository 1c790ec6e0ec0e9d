"""Where a server listens: `--listen` parsing, the refusal to serve off loopback without credentials, and the one
message for an address that cannot be bound — shared by the exporter, the optimizer, the proxy and the simulator."""

from __future__ import annotations

import ipaddress
import os

from gpurouter.urls import authority

ALL_INTERFACES = "0.0.0.0"  # what `--listen :PORT` means


def parse_listen(text: str, default: str = "127.0.0.1:PORT") -> tuple[str, int]:
    """`HOST:PORT`, `[IPv6]:PORT`, or `:PORT` for every interface (as Prometheus exporters take it) → (host,
    port); raises ValueError naming the problem and an example."""
    host, sep, port = text.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    if sep and not host and not bracketed:
        host = ALL_INTERFACES
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535 or (":" in host and not bracketed):
        raise ValueError(f"--listen: expected HOST:PORT, [IPv6]:PORT or :PORT like {default}, got {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_listen_refusal(
    command: str, host: str, auth_enabled: bool, insecure: bool, *, missing: str, risk: str, fix: str
) -> str:
    """Why `command` will not serve `host` (not loopback) to anyone without credentials; empty when it may."""
    if auth_enabled or insecure or is_loopback(host):
        return ""
    return (
        f"gpu-router {command}: refusing to listen on {host}: no {missing}, so anyone who reaches it could {risk}; "
        f"{fix}, listen on 127.0.0.1, or pass --insecure"
    )


def cannot_listen(host: str, port: int, exc: OSError) -> str:
    """`cannot listen on 127.0.0.1:9877: address already in use` — the same words from every server (the
    system's reason for the error number; aiohttp's own wrapping and waitress's capitals left out)."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"cannot listen on {authority(host, port)}: {reason[:1].lower()}{reason[1:]}"
