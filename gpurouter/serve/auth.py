"""Credentials for the optimizer's write endpoints (/webhook, POST /api/v1/optimize), and with
`optimizer.protect_reads` for its read endpoints too: bearer or basic auth.

Secrets are resolved once, when the service starts (a missing file or variable is a ConfigError then, not a
401 later), and compared in constant time.
"""

from __future__ import annotations

import binascii
import hmac
from base64 import b64decode

from gpurouter.cluster.config import WebhookAuth


class Authenticator:
    """Decides whether an `Authorization` header carries the configured credentials."""

    def __init__(self, auth: WebhookAuth) -> None:
        self.scheme: str | None = None
        self._expected = b""
        if auth.bearer_token is not None:
            self.scheme = "Bearer"
            self._expected = _bytes(auth.bearer_token.resolve())
        elif auth.username is not None and auth.password is not None:
            self.scheme = "Basic"
            self._expected = _bytes(f"{auth.username}:{auth.password.resolve()}")

    @property
    def enabled(self) -> bool:
        return self.scheme is not None

    @property
    def challenge(self) -> str:
        """The WWW-Authenticate value of a 401 answer."""
        return f'{self.scheme or "Bearer"} realm="gpu-router"'

    def allows(self, header: str | None) -> bool:
        """True when no credentials are configured or the header carries them; never raises."""
        if self.scheme is None:
            return True
        if not header:
            return False
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != self.scheme.lower():
            return False
        value = value.strip()
        if self.scheme == "Basic":
            try:
                given = b64decode(value.encode("ascii"), validate=True)
            except (UnicodeEncodeError, binascii.Error, ValueError):
                return False
        else:
            given = _bytes(value)
        return hmac.compare_digest(given, self._expected)


def _bytes(text: str) -> bytes:
    """UTF-8, with lone surrogates kept distinct (a header may hold anything)."""
    return text.encode("utf-8", "surrogatepass")
