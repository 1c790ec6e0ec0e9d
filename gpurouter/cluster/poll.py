"""Reads of many Ollama nodes at once on one asyncio event loop (aiohttp), each node within its own deadline.

The loop runs in a daemon thread of its own; callers in any thread block on `Poller.read` (or get a future from
`Poller.show`). All requests share one aiohttp session: one connection pool, redirects never followed (a 3xx
is a node error, as in `OllamaClient`), at most `concurrency` nodes read at once (the others wait their turn,
and a node's deadline starts with its turn).

A node is down only when it did not answer in time, never because this process was late to read an answer
that had arrived: the deadline runs on the loop, a clock ticking on the same loop counts the time the loop
woke late (the process busy elsewhere, or starved of CPU) and gives that time back to every node waiting,
and before a node is declared timed out the loop reads what is already in its sockets. Parsing the answers
into results happens here (an answer unchanged since the node's last one keeps its result); sizing them is
the caller's, after the I/O.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import requests
import yarl

from gpurouter.cluster.ollama import (
    OllamaError,
    ShowInfo,
    answer_error,
    json_object,
    parse_ps,
    parse_show,
    parse_tags,
    parse_version,
    transport_error,
)
from gpurouter.urls import redact

# Nodes read at once (two or three requests each): past that, nodes wait their turn. The requests in flight
# set the process's peak memory (about 20 KB each): 512 keeps a 1000-node exporter under 100 MiB.
CONCURRENCY = 512
TICK = 0.01  # seconds between the lateness clock's ticks
LATE = 0.005  # a wake-up later than this is the process's own delay
DRAIN = 8  # loop turns that read what already arrived before a node is declared timed out

_PARSE: dict[str, tuple[str, str, Callable[[Mapping[str, Any], str], Any]]] = {
    "ps": ("GET", "/api/ps", parse_ps),
    "tags": ("GET", "/api/tags", parse_tags),
    "version": ("GET", "/api/version", parse_version),
}


@dataclass(frozen=True)
class Target:
    """One node to read: its name, base URL and which reads (`ps`, `tags`, `version`)."""

    name: str
    url: str
    reads: tuple[str, ...]


@dataclass(frozen=True)
class Answers:
    """One node's reads: the results by read, or the first error; and how long the node took."""

    values: Mapping[str, Any]
    error: OllamaError | None
    seconds: float


class _Lateness:
    """While running, counts the seconds this loop woke later than asked (beyond `LATE`): the process's delay."""

    def __init__(self) -> None:
        self.seconds = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(TICK)
            late = loop.time() - before - TICK
            if late > LATE:
                self.seconds += late


def _end(turn: list[float] | None, limit: float, clock: _Lateness) -> float:
    """When a node's turn ends: `limit` after it began, plus the process's own delay since."""
    if turn is None:
        return math.inf  # still waiting for its turn
    return turn[0] + limit + clock.seconds - turn[1]


class Poller:
    """One event loop thread and one aiohttp session for every node of a configuration."""

    def __init__(self, urls: Iterable[str] = (), *, concurrency: int = CONCURRENCY) -> None:
        # proxies from the environment are looked up once, as `node_session` does for the action client
        self._trust_env = any(requests.utils.get_environ_proxies(url) for url in urls)
        self._concurrency = concurrency
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="poll-loop", daemon=True)
        self._thread.start()
        self._session: aiohttp.ClientSession = self._call(self._open())
        self._slots = asyncio.Semaphore(concurrency)
        self._shown_urls: dict[str, str] = {}
        self._addresses: dict[tuple[str, str], yarl.URL] = {}
        self._last: dict[tuple[str, str], tuple[bytes, Any]] = {}  # (url, read) → (last answer's hash, result)

    async def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=3 * self._concurrency, limit_per_host=0, ttl_dns_cache=300)
        return aiohttp.ClientSession(
            connector=connector,
            trust_env=self._trust_env,
            timeout=aiohttp.ClientTimeout(total=None),
            cookie_jar=aiohttp.DummyCookieJar(),  # Ollama sets no cookies: none to keep or send
        )

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            self._call(self._session.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    # --------------------------------------------------------------------------------------- reads

    def read(self, targets: Sequence[Target], limit: float) -> dict[str, Answers]:
        """Every target's reads, each node within `limit` seconds of its turn (plus the process's own delay)."""
        return self._call(self._read_all(targets, limit))  # type: ignore[no-any-return]

    async def _read_all(self, targets: Sequence[Target], limit: float) -> dict[str, Answers]:
        """All nodes at once; one watch (one timer, not one per node) ends each node's turn at its deadline."""
        loop = asyncio.get_running_loop()
        clock = _Lateness()
        ticking = asyncio.ensure_future(clock.run())
        turns: dict[str, list[float]] = {}  # node → [loop time its reads began, the clock's lateness then]
        tasks = {asyncio.ensure_future(self._node(t, turns, clock)): t for t in targets}
        timed_out: dict[asyncio.Future[Answers], float] = {}
        try:
            pending = set(tasks)
            while pending:
                wake = min(_end(turns.get(tasks[task].name), limit, clock) for task in pending)
                if wake > loop.time():
                    waiting = len(turns) < len(tasks)  # nodes still waiting for their turn: looked at every 0.1 s
                    timeout = min(wake - loop.time(), 0.1) if waiting else wake - loop.time()
                    _, pending = await asyncio.wait(pending, timeout=timeout)
                    continue
                for _ in range(DRAIN):  # read what already arrived (and let the clock count a late wake-up)
                    await asyncio.sleep(0)
                now = loop.time()
                for task in [t for t in pending if not t.done()]:
                    turn = turns.get(tasks[task].name)
                    if turn is not None and _end(turn, limit, clock) <= now:
                        task.cancel()
                        timed_out[task] = now - turn[0]
                pending = {t for t in pending if not t.done()}
        finally:
            ticking.cancel()
            for task in tasks:
                task.cancel()
        answers = {}
        for task, target in tasks.items():
            if task in timed_out or task.cancelled():
                error = OllamaError("timeout", f"{self._shown(target.url)}: no answer within {limit:g}s")
                answers[target.name] = Answers({}, error, timed_out.get(task, limit))
            else:
                answers[target.name] = task.result()
        return answers

    async def _node(self, target: Target, turns: dict[str, list[float]], clock: _Lateness) -> Answers:
        loop = asyncio.get_running_loop()
        async with self._slots:
            turns[target.name] = turn = [loop.time(), clock.seconds]
            results = await asyncio.gather(*(self._get(target.url, what) for what in target.reads))
            seconds = loop.time() - turn[0]
        for result in results:
            if isinstance(result, OllamaError):
                return Answers({}, result, seconds)
        return Answers(dict(zip(target.reads, results, strict=True)), None, seconds)

    def _shown(self, url: str) -> str:
        """The node's URL as messages name it (no credentials, no trailing slash), worked out once per URL."""
        shown = self._shown_urls.get(url)
        if shown is None:
            shown = self._shown_urls[url] = redact(url.rstrip("/"))
        return shown

    async def _get(self, url: str, what: str) -> Any:
        """One read's result, or its `OllamaError` (returned, so that the first failure is the one reported).
        An answer the same as the node's last one (by a 128-bit hash) gives the same result, not parsed again."""
        method, path, parse = _PARSE[what]
        try:
            content = await self._request(method, url, path, None, None)
            digest = hashlib.blake2b(content, digest_size=16).digest()  # not the answer: it is let go at once
            last = self._last.get((url, what))
            if last is not None and last[0] == digest:
                return last[1]
            shown = self._shown(url)
            result = parse(json_object(content, shown + path), shown)
            self._last[(url, what)] = (digest, result)
            return result
        except OllamaError as exc:
            return exc
        except Exception as exc:  # anything else about this node is its error, never the poll's
            return OllamaError("error", redact(f"{url}: {type(exc).__name__}: {exc}"))

    async def _request(
        self, method: str, url: str, path: str, payload: Mapping[str, Any] | None, limit: float | None
    ) -> bytes:
        """The body of a 2xx answer; OllamaError for any other answer or none."""
        address = self._addresses.get((url, path))
        if address is None:  # parsed once, not on every request
            address = self._addresses[(url, path)] = yarl.URL(url.rstrip("/") + path)
        try:
            async with self._session.request(method, address, json=payload, allow_redirects=False) as response:
                content = await response.read()
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            kind, words = transport_error(exc, limit)
            raise OllamaError(kind, f"{self._shown(url)}{path}: {words}") from None
        if response.status >= 300:
            shown = self._shown(url) + path
            raise answer_error(shown, response.status, content, response.reason or "", response.headers.get("Location"))
        return content

    # ---------------------------------------------------------------------------------------- show

    def show(self, url: str, model: str, timeout: float) -> concurrent.futures.Future[ShowInfo]:
        """/api/show of `model` on the node at `url`, within `timeout` seconds; the future fails with OllamaError."""
        return asyncio.run_coroutine_threadsafe(self._show(url, model, timeout), self._loop)

    async def _show(self, url: str, model: str, timeout: float) -> ShowInfo:
        try:
            asking = self._request("POST", url, "/api/show", {"model": model}, timeout)
            content = await asyncio.wait_for(asking, timeout)
        except asyncio.TimeoutError:
            raise OllamaError("timeout", f"{self._shown(url)}/api/show: no answer within {timeout:g}s") from None
        return parse_show(json_object(content, f"{self._shown(url)}/api/show"), self._shown(url))
