"""A small client for one Ollama node's HTTP API, with typed results and errors classified by status."""

from __future__ import annotations

import json
import socket
import ssl
import sys
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Any

import requests

from gpurouter.urls import redact


class OllamaError(Exception):
    """A call that failed; `kind` says how, never derived from the message text.

    Kinds: name_lookup, refused, reset, tls, timeout, unreachable (`transport_error`), not_found (404),
    bad_request (400), busy (503), server_error (5xx), redirect (3xx: never followed), http (any other non-2xx),
    garbage (a body that is not the JSON expected).
    """

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass(frozen=True)
class InstalledModel:
    """One entry of /api/tags."""

    name: str
    size: int
    digest: str
    modified_at: str = ""
    details: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class LoadedModel:
    """One entry of /api/ps."""

    name: str
    size: int
    size_vram: int
    digest: str = ""
    expires_at: datetime | None = None
    context_length: int | None = None
    details: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def gpu_ratio(self) -> float:
        """size_vram / size: 1 = all on GPU, 0 = all on CPU."""
        return min(1.0, self.size_vram / self.size) if self.size > 0 else 0.0

    @property
    def fully_on_gpu(self) -> bool:
        return self.size > 0 and self.size_vram >= self.size

    @property
    def placement(self) -> tuple[int, int]:
        """(size, size_vram): a change means the runner was loaded again, with another placement."""
        return self.size, self.size_vram


@dataclass(frozen=True)
class ShowInfo:
    """The parts of /api/show that sizing and loading need."""

    capabilities: tuple[str, ...]
    details: Mapping[str, Any]
    model_info: Mapping[str, Any]
    tensors: tuple[Mapping[str, Any], ...]
    parameters: str
    raw: Mapping[str, Any]

    @property
    def embedding(self) -> bool:
        return "embedding" in self.capabilities

    @property
    def num_ctx(self) -> int | None:
        """The Modelfile's `num_ctx` parameter, if it sets one."""
        for line in self.parameters.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "num_ctx" and parts[1].isdigit():
                return int(parts[1])
        return None


def load_request(
    model: str,
    *,
    num_ctx: int | None = None,
    keep_alive: int | float | str = -1,
    num_gpu: int | None = None,
    embedding: bool = False,
) -> tuple[str, dict[str, Any]]:
    """(path, body) of a load with no work: /api/embed with empty input for embedders, else an empty generate.
    Asked of a runner that is loaded with these options, it only resets the runner's keep_alive."""
    options = {k: v for k, v in (("num_ctx", num_ctx), ("num_gpu", num_gpu)) if v is not None}
    body: dict[str, Any] = {"model": model, "keep_alive": keep_alive, **({"options": options} if options else {})}
    if embedding:
        return "/api/embed", {**body, "input": []}
    return "/api/generate", {**body, "prompt": "", "stream": False}


class OllamaClient:
    """One node's API over one `requests.Session`, so connections are reused."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 1.0,
        read_timeout: float = 5.0,
        session: requests.Session | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.shown = redact(self.base_url)  # what messages name: without credentials
        self.timeout = (connect_timeout, read_timeout)
        self.session = session or requests.Session()

    def close(self) -> None:
        self.session.close()

    # ------------------------------------------------------------------------------------------ reads

    def version(self, timeout: float | None = None) -> str:
        return parse_version(self._call("GET", "/api/version", timeout=timeout), self.shown)

    def tags(self, timeout: float | None = None) -> tuple[InstalledModel, ...]:
        return parse_tags(self._call("GET", "/api/tags", timeout=timeout), self.shown)

    def ps(self, timeout: float | None = None) -> tuple[LoadedModel, ...]:
        return parse_ps(self._call("GET", "/api/ps", timeout=timeout), self.shown)

    def show(self, model: str, timeout: float | None = None) -> ShowInfo:
        return parse_show(self._call("POST", "/api/show", {"model": model}, timeout=timeout), self.shown)

    # ---------------------------------------------------------------------------------------- actions

    def load(
        self,
        model: str,
        *,
        num_ctx: int | None = None,
        keep_alive: int | float | str = -1,
        num_gpu: int | None = None,
        embedding: bool = False,
        timeout: float = 300.0,
    ) -> None:
        """Load (pre-warm) a model: /api/embed with empty input for embedders, else an empty generate.

        Returns when Ollama says the load is done; where it landed is for /api/ps to tell.
        """
        path, body = load_request(model, num_ctx=num_ctx, keep_alive=keep_alive, num_gpu=num_gpu, embedding=embedding)
        self._call("POST", path, body, timeout=timeout)

    def unload(self, model: str, *, embedding: bool = False, timeout: float | None = None) -> None:
        """Ask Ollama to unload a model now (keep_alive 0); it answers before the runner is gone."""
        if embedding:
            self._call("POST", "/api/embed", {"model": model, "input": [], "keep_alive": 0}, timeout=timeout)
        else:
            body = {"model": model, "prompt": "", "keep_alive": 0, "stream": False}
            self._call("POST", "/api/generate", body, timeout=timeout)

    # ---------------------------------------------------------------------------------------- plumbing

    def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        url = self.shown + path
        limit = self.timeout if timeout is None else (min(self.timeout[0], timeout), timeout)
        try:
            response = self.session.request(
                method, self.base_url + path, json=body, timeout=limit, allow_redirects=False
            )
        except requests.exceptions.RequestException as exc:
            kind, words = transport_error(exc, limit)
            raise OllamaError(kind, f"{url}: {words}") from None
        status = response.status_code
        if status >= 300:
            raise answer_error(url, status, response.content, response.reason or "", response.headers.get("Location"))
        return json_object(response.content, url, status)


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and everything behind it: causes, contexts, urllib3's `reason`, exceptions in `args`."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e in seen:
            continue
        seen.append(e)
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "reason", None)) if isinstance(x, BaseException)]
        todo += [a for a in e.args if isinstance(a, BaseException)]
    return seen


def transport_error(exc: BaseException, timeout: tuple[float, float] | float | None = None) -> tuple[str, str]:
    """(kind, words) for a request that got no HTTP answer: each cause its own words, the one place that says so.

    name_lookup: the host name does not resolve; refused: nothing listens on that port; reset: the connection
    was reset or closed before an answer; tls: the TLS handshake failed; timeout: no connection or no answer in
    time; unreachable: anything else on the way (no route to host, ...).
    """
    connect, read = timeout if isinstance(timeout, tuple) else (timeout, timeout)
    chain = _causes(exc)
    names = {type(e).__name__ for e in chain}
    if any(isinstance(e, socket.gaierror) for e in chain) or "NameResolutionError" in names:
        return "name_lookup", "host name does not resolve: DNS lookup failed"
    if any(isinstance(e, (ssl.SSLError, requests.exceptions.SSLError)) for e in chain):
        detail = next((str(e.reason or e) for e in chain if isinstance(e, ssl.SSLError)), "")
        return "tls", "TLS handshake failed" + (f": {detail}" if detail else "")
    if any(isinstance(e, ConnectionRefusedError) for e in chain):
        return "refused", "connection refused: nothing listens on that port, or the node is down"
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "timeout", "no connection within " + (f"{connect:g}s" if connect else "the time limit")
    if isinstance(exc, requests.exceptions.ReadTimeout) or any(isinstance(e, TimeoutError) for e in chain):
        return "timeout", "no answer within " + (f"{read:g}s" if read else "the time limit")
    reset = any(isinstance(e, ConnectionResetError) for e in chain)
    if reset or names & {"RemoteDisconnected", "ServerDisconnectedError"}:
        return "reset", "connection reset: the server closed it before answering"
    detail = next((e for e in reversed(chain) if isinstance(e, OSError) and e.strerror), None)
    return "unreachable", detail.strerror if detail is not None and detail.strerror else type(exc).__name__


def redirect_error(url: str, status: int, location: str | None) -> OllamaError | None:
    """A redirect as the node error it is (None for any other status): only configured URLs are contacted, so
    it is never followed. Every client of a node (requests or aiohttp) asks this before reading an answer."""
    if not 300 <= status < 400:
        return None
    target = "".join(c if c.isprintable() else "?" for c in redact(location[:200])) if location else "nowhere"
    return OllamaError("redirect", f"{url}: node answered a redirect to {target} (not followed)", status)


def _kind(status: int) -> str:
    if status == 404:
        return "not_found"
    if status == 400:
        return "bad_request"
    if status == 503:
        return "busy"
    if status >= 500:
        return "server_error"
    return "http"


def error_words(content: bytes, reason: str = "") -> str:
    """What an error answer says: Ollama's `{"error": ...}`, else the start of the body, else the reason."""
    try:
        body = json.loads(content)
    except ValueError:
        return content[:200].decode(errors="replace").strip() or reason
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"][:200]
    return json.dumps(body)[:200]


def answer_error(url: str, status: int, content: bytes, reason: str = "", location: str | None = None) -> OllamaError:
    """The error for a non-2xx answer (a 3xx too: redirects are not followed), classified by its status."""
    redirect = redirect_error(url, status, location)
    if redirect is not None:
        return redirect
    return OllamaError(_kind(status), f"{url}: HTTP {status}: {error_words(content, reason)}", status)


def json_object(content: bytes, url: str, status: int | None = None) -> dict[str, Any]:
    """The answer's JSON object; `garbage` when it is not JSON or not an object."""
    try:
        parsed = json.loads(content)
    except ValueError:
        raise OllamaError("garbage", f"{url}: answer is not JSON", status) from None
    if not isinstance(parsed, dict):
        raise OllamaError("garbage", f"{url}: expected a JSON object", status)
    return parsed


# ----------------------------------------------------------------------------------- answers → results
# `shown` is the node's URL as messages name it (without credentials).


def parse_version(body: Mapping[str, Any], shown: str) -> str:
    version = body.get("version")
    if not isinstance(version, str):
        raise OllamaError("garbage", f"{shown}/api/version: no version string in the answer")
    return version


def _models(body: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
    models = body.get("models")
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise OllamaError("garbage", f"{where}: expected {{'models': [...]}}")
    return models


_DETAILS: dict[Hashable, Mapping[str, Any]] = {}
_DETAILS_KEPT = 4096


def _details(raw: Any) -> Mapping[str, Any]:
    """A model's `details`, read-only; one shared copy per distinct value (a fleet repeats the same few)."""
    value = dict(raw or {})
    try:
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in value.items()))
        shared = _DETAILS.get(key)
    except TypeError:  # a value that cannot be a key: not shared
        return MappingProxyType(value)
    if shared is None:
        if len(_DETAILS) >= _DETAILS_KEPT:
            _DETAILS.clear()
        shared = _DETAILS[key] = MappingProxyType(value)
    return shared


def _text(value: Any) -> str:
    """A name, digest or date: one copy per distinct text however many nodes and polls repeat it."""
    return sys.intern(str(value))


def parse_tags(body: Mapping[str, Any], shown: str) -> tuple[InstalledModel, ...]:
    where = f"{shown}/api/tags"
    models = _models(body, where)
    try:
        return tuple(
            InstalledModel(
                name=_text(m["name"]),
                size=_int(m["size"]),
                digest=_text(m.get("digest", "")),
                modified_at=_text(m.get("modified_at", "")),
                details=_details(m.get("details")),
            )
            for m in models
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise OllamaError("garbage", f"{where}: malformed model entry ({exc})") from None


def parse_ps(body: Mapping[str, Any], shown: str) -> tuple[LoadedModel, ...]:
    where = f"{shown}/api/ps"
    models = _models(body, where)
    try:
        return tuple(
            LoadedModel(
                name=_text(m["name"]),
                size=_int(m["size"]),
                size_vram=_int(m.get("size_vram", 0)),
                digest=_text(m.get("digest", "")),
                expires_at=parse_go_time(m.get("expires_at")),
                context_length=_int(m["context_length"]) if m.get("context_length") is not None else None,
                details=_details(m.get("details")),
            )
            for m in models
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise OllamaError("garbage", f"{where}: malformed model entry ({exc})") from None


def parse_show(body: Mapping[str, Any], shown: str) -> ShowInfo:
    try:
        return ShowInfo(
            capabilities=tuple(str(c) for c in body.get("capabilities") or ()),
            details=MappingProxyType(dict(body.get("details") or {})),
            model_info=MappingProxyType(dict(body.get("model_info") or {})),
            tensors=tuple(MappingProxyType(dict(t)) for t in body.get("tensors") or ()),
            parameters=str(body.get("parameters") or ""),
            raw=MappingProxyType(body),
        )
    except (TypeError, ValueError) as exc:
        raise OllamaError("garbage", f"{shown}/api/show: malformed answer ({exc})") from None


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"expected a non-negative number, got {value!r}")
    return int(value)


def parse_go_time(value: Any) -> datetime | None:
    """Go's RFC 3339 time (up to 9 fractional digits) as an aware datetime; None when absent."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a timestamp, got {value!r}")
    text = value.replace("Z", "+00:00")
    if "." in text:
        head, rest = text.split(".", 1)
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    return datetime.fromisoformat(text)
