"""GPU capacity from Ollama's own server log (`gpu_source: ollama_log`): the devices of its newest start.

What Ollama writes, read from the ollama/ollama source (tags named):

- `logutil/logutil.go` (v0.32.15): slog's TextHandler with the source file's base name, so every line is
  ``time=2026-06-30T15:57:39.302+08:00 level=INFO source=types.go:50 msg="inference compute" key=value …``;
  a value is quoted (Go `strconv.Quote`) when it is empty or holds a space, `=` or `"`. journald's default
  output puts ``Aug 16 00:44:19 host ollama[3422]: `` in front; `-o cat` does not.
- `server/routes.go` `Serve` (v0.1.40 … v0.33.0-rc2), in this order at every start: ``msg="server config"
  env="map[… OLLAMA_CONTEXT_LENGTH:0 …]"`` (before v0.7.0 written before slog is set up, as
  ``2024/08/24 22:31:35 routes.go:1125: INFO server config env="map[…]"``), then
  ``msg="Listening on 127.0.0.1:11434 (version 0.32.15)"``, then the device lines, then (v0.15.5+)
  ``msg="vram-based default context" total_vram="8.0 GiB" default_num_ctx=4096``. The tier line is written even
  when OLLAMA_CONTEXT_LENGTH is set; that setting then wins (`api.DefaultOptions` takes it as `NumCtx`, and
  `modelOptions` uses the tier only when it is 0). From v0.6.0 to v0.15.4 the `server config` line shows the
  default itself (`envconfig/config.go`: OLLAMA_CONTEXT_LENGTH 2048, later 4096; 0 from v0.15.5).
- `discover/types.go` `LogDetails` (v0.12.10 … v0.33.0-rc2), one line per device, most free memory first:
  ``msg="inference compute" id=GPU-… filter_id="" library=CUDA compute=8.6 name=CUDA0
  description="NVIDIA GeForce RTX 3070" libdirs=ollama,cuda_v12 driver=12.8 pci_id=0000:01:00.0 type=discrete
  total="8.0 GiB" available="7.4 GiB"`` (v0.12.4–v0.12.6 without the id filter, v0.12.7–v0.12.9 with
  `filtered_id`); without any GPU one line ``id=cpu library=cpu compute="" name=cpu description=cpu
  libdirs=ollama driver="" pci_id="" type="" total=… available=…`` (the system's memory, not VRAM). Up to
  v0.12.3 (`gpu/types.go`, then `discover/types.go`): ``id=GPU-… library=cuda variant=v12 compute=8.6
  driver=12.8 name="NVIDIA GeForce RTX 3070" total=… available=…``, and ``library=cpu`` without a GPU.
- `format/bytes.go` `HumanBytes2`: ``"%.1f GiB"`` / MiB / KiB, or ``"%d B"``; never TiB (accepted anyway).
- `app/server/server.go` `GetInferenceInfo` (v0.32.15), how Ollama's desktop app reads the same lines: a line
  matching ``inference compute.*library=`` is a device, each field read as ``key="…"`` or ``key=\\S+``; the
  ``vram-based default context`` line gives ``default_num_ctx``. The app rotates `server.log` at every server
  start, so it reads the first start of a file; a journal or an appended file holds many, hence the rules below.

A start begins at its `server config` line, or at a `Listening on` line once the start before it has logged
devices (its `server config` line was cut off), or at a device line that follows a `vram-based default
context` line (both markers cut or filtered out). The newest start wins: a newest start that has not logged
its devices yet makes the capacity unknown rather than the start before it.

Precision: sizes are printed to 0.1 GiB, so a figure like "8.0 GiB" stands for any total from 7.95 to
8.05 GiB; the printed value is taken, which may be up to 0.05 GiB (51.2 MiB, 0.6 % of an 8 GiB card) above
the driver's figure. That is inside the era's own margin (llama.cpp's 1 GiB, the 457 MiB reserve), but a fit
decided within 52 MiB of the edge cannot be decided from this source. `available` is the free memory at the
server's start, not now, so it is kept as information only (GPU `used` stays unknown).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from stat import S_ISREG
from typing import BinaryIO

from gpurouter.cluster.state import Capacity, GpuInfo
from gpurouter.units import MIB, parse_size

_PHRASES = ("inference compute", "server config", "Listening on", "vram-based default context")  # other lines: skipped
# key=value pairs of a slog text line: the key up to "=", the value quoted (Go escapes) or up to a space
_PAIR = re.compile(r'(?<!\S)([^\s="]+)=("(?:[^"\\]|\\.)*"|\S*)')
_OLD_SERVER_CONFIG = re.compile(r"\bINFO server config env=")  # before v0.7.0: slog not set up yet
_VERSION = re.compile(r"\(version ([^)\s]+)\)")
_CONTEXT_ENV = re.compile(r"\bOLLAMA_CONTEXT_LENGTH:(\d+)")
_SIZE = re.compile(r"^\d+(?:\.\d+)? ?(?:B|KiB|MiB|GiB|TiB)$")
_HEAD = 256  # bytes that tell a rewritten file from a grown one
NO_DEVICES = 'no "inference compute" line (is this Ollama\'s server log, and does it reach back to its last start?)'


class LogUnavailable(Exception):
    """The log could not be read; the message is the reason, one line."""


@dataclass(frozen=True)
class LogDevice:
    """One `inference compute` line."""

    id: str
    library: str
    name: str  # the product name: `description` where the line has one, else `name`
    total: int  # bytes, as printed (to 0.1 GiB)
    available: int  # bytes free at the server's start
    pci_id: str = ""

    @property
    def is_cpu(self) -> bool:
        return self.library.lower() == "cpu"


@dataclass(frozen=True)
class ServerStart:
    """What one start of the server logged."""

    time: str = ""  # the slog time of its first line seen ("" when that line had none)
    version: str | None = None  # from "Listening on … (version X)"
    devices: tuple[LogDevice, ...] = ()
    context_length_env: int | None = None  # OLLAMA_CONTEXT_LENGTH from "server config" (0 = unset)
    vram_default_context: int | None = None  # default_num_ctx of "vram-based default context" (v0.15.5+)
    error: str | None = None  # the first device line that could not be read

    @property
    def default_context(self) -> int | None:
        """The context a model gets when nothing else sets one: OLLAMA_CONTEXT_LENGTH when set (> 0), else
        the VRAM tier the log states; None when the log states neither."""
        if self.context_length_env:
            return self.context_length_env
        return self.vram_default_context


@dataclass(frozen=True)
class ServerLog:
    """The newest start of a log and how many starts it holds."""

    starts: int = 0
    newest: ServerStart | None = None


@dataclass
class ServerLogParser:
    """A fold over log lines; `feed` may be called again with the lines appended since."""

    starts: int = 0
    current: ServerStart | None = None

    @property
    def log(self) -> ServerLog:
        return ServerLog(self.starts, self.current)

    def feed(self, text: str) -> ServerLogParser:
        end = -1
        for found in sorted(_occurrences(text)):  # only the lines that can matter are split out
            if found <= end:
                continue  # a second phrase on a line already read
            begin = text.rfind("\n", 0, found) + 1
            end = len(text) if (newline := text.find("\n", found)) < 0 else newline
            self._line(text[begin:end])
        return self

    def _new_start(self, time: str) -> ServerStart:
        self.starts += 1
        self.current = ServerStart(time=time)
        return self.current

    def _line(self, line: str) -> None:
        if _OLD_SERVER_CONFIG.search(line):
            self._server_config(line, "")
            return
        fields = {key: _unquote(value) for key, value in _PAIR.findall(line)}
        msg = fields.get("msg", "")
        time = fields.get("time", "")
        if msg == "server config":
            self._server_config(fields.get("env", ""), time)
        elif msg.startswith("Listening on "):
            start = self.current
            if start is None or start.devices or start.error:
                start = self._new_start(time)
            version = _VERSION.search(msg)
            self.current = replace(start, version=version.group(1) if version else None)
        elif msg == "inference compute":
            start = self.current
            if start is None or start.vram_default_context is not None:
                start = self._new_start(time)
            try:
                device = _device(fields)
            except ValueError as exc:
                self.current = replace(start, error=start.error or str(exc))
            else:
                self.current = replace(start, devices=(*start.devices, device))
        elif msg == "vram-based default context":
            start = self.current or self._new_start(time)
            ctx = fields.get("default_num_ctx", "")
            self.current = replace(start, vram_default_context=int(ctx) if ctx.isdigit() else None)

    def _server_config(self, env: str, time: str) -> None:
        start = self._new_start(time)
        match = _CONTEXT_ENV.search(env)
        self.current = replace(start, context_length_env=int(match.group(1)) if match else None)


def _occurrences(text: str) -> Iterator[int]:
    """Where each of the phrases occurs (str.find: much faster than a regex over a large log)."""
    for phrase in _PHRASES:
        found = text.find(phrase)
        while found >= 0:
            yield found
            found = text.find(phrase, found + 1)


def parse_server_log(text: str) -> ServerLog:
    """The newest start of an Ollama server log (pure)."""
    return ServerLogParser().feed(text).log


def parse_go_size(text: str) -> int:
    """Bytes from Go's `format.HumanBytes2` ("8.0 GiB", "512.0 MiB", "0 B"); ValueError otherwise."""
    if not _SIZE.match(text.strip()):
        raise ValueError(f"expected a size like 8.0 GiB, got {text!r}")
    return parse_size(text)


def _unquote(value: str) -> str:
    if not value.startswith('"'):
        return value
    try:
        return str(json.loads(value))
    except ValueError:  # a Go escape JSON lacks (\x, \a, \v, \U): keep the character after the backslash
        return re.sub(r"\\(.)", r"\1", value[1:-1])


def _device(fields: dict[str, str]) -> LogDevice:
    sizes = {}
    for key in ("total", "available"):
        try:
            sizes[key] = parse_go_size(fields.get(key, ""))
        except ValueError:
            raise ValueError(f'an "inference compute" line has {key}={fields.get(key, "")!r}') from None
    return LogDevice(
        id=fields.get("id", ""),
        library=fields.get("library", ""),
        name=fields.get("description") or fields.get("name") or fields.get("id", ""),
        total=sizes["total"],
        available=sizes["available"],
        pci_id=fields.get("pci_id", ""),
    )


def log_capacity(log: ServerLog, where: str) -> Capacity:
    """The capacity the newest start states (pure): its GPUs, `none` when it found only the CPU, or unknown
    with the reason. GPUs are numbered in PCI order where every line has a `pci_id` (NVML's order), else in
    the log's order (most free memory first)."""
    start = log.newest
    if start is None:
        return Capacity(source="unknown", reason=f"ollama_log: {where}: {NO_DEVICES}")
    when = f"the start at {start.time}" if start.time else "the newest start"
    if start.error is not None:
        return Capacity(source="unknown", reason=f"ollama_log: {where}: {when}: {start.error}")
    if not start.devices:
        reason = f'ollama_log: {where}: {when} logged no "inference compute" line (still starting, or cut off)'
        return Capacity(source="unknown", reason=reason)
    about = f"Ollama's log ({where}), {when}" + (f", version {start.version}" if start.version else "")
    gpus = [d for d in start.devices if not d.is_cpu]
    if not gpus:
        return Capacity(source="none", reason=f"no GPU: {about}", default_context=start.default_context)
    if all(d.pci_id for d in gpus):
        gpus.sort(key=lambda d: d.pci_id)
    return Capacity(
        source="ollama_log",
        gpus=tuple(GpuInfo(index=i, name=d.name, total=d.total) for i, d in enumerate(gpus)),
        reason=about,
        default_context=start.default_context,
    )


# ------------------------------------------------------------------------------------------------ reading

# Reads are bounded: a file is read in chunks, never more than its last TAIL bytes (a file seen for the first
# time, or grown by more since the last read, is read from TAIL before its end); a command's output keeps only
# its last OUTPUT_TAIL bytes of each stream. A line longer than LONG_LINE is skipped, and not read again.
TAIL = 256 * MIB
OUTPUT_TAIL = 16 * MIB
LONG_LINE = MIB  # Ollama's longest line that matters, `server config`, is a few KiB
_CHUNK = MIB
_AT_ONCE = 16  # commands running at once (each ends by its deadline)
_COMMANDS = threading.BoundedSemaphore(_AT_ONCE)


class LogFile:
    """One log file, read incrementally: only the lines appended since the last read are parsed. A file that
    was replaced (rotated), shrank, or whose first bytes changed (rewritten in place) is read again from its
    start. Only a regular file is read, opened without blocking (a FIFO or a device would block or never end).
    Thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._identity: tuple[int, int] | None = None
        self._offset = 0  # where the next read starts: after the last whole line parsed
        self._skipping = False  # the next read starts inside a line too long to read (or cut by the tail)
        self._cut = False  # the parser started at the tail, not at the file's start
        self._head = b""  # the file's first bytes when it was read from its start
        self._parser = ServerLogParser()

    @property
    def where(self) -> str:
        """The file, as a reason names it (with the tail read when its start was not)."""
        return f"{self.path} (its last {TAIL // MIB} MiB)" if self._cut else str(self.path)

    def read(self) -> ServerLog:
        """The log as it stands; LogUnavailable when the file cannot be read, is not a regular file, or is empty."""
        with self._lock:
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError as exc:
                raise LogUnavailable(f"ollama_log: cannot read {self.path}: {exc.strerror or exc}") from None
            try:
                stat = os.fstat(fd)
                if not S_ISREG(stat.st_mode):
                    raise LogUnavailable(
                        f"ollama_log: {self.path} is not a regular file (a FIFO or device blocks or never ends; "
                        "read it with command: instead)"
                    )
                with os.fdopen(fd, "rb", buffering=0, closefd=False) as handle:
                    pending = self._read_new(handle, stat)
            except OSError as exc:
                raise LogUnavailable(f"ollama_log: cannot read {self.path}: {exc.strerror or exc}") from None
            finally:
                os.close(fd)
            if stat.st_size == 0:
                raise LogUnavailable(f"ollama_log: {self.path} is empty")
            text = pending.decode("utf-8", "replace")  # a line still being written: parsed, and again next time
            return copy.deepcopy(self._parser).feed(text).log if text.strip() else self._parser.log

    def _read_new(self, handle: BinaryIO, stat: os.stat_result) -> bytes:
        """Parse the whole lines from the last read (or the tail) to the size `stat` gives; the bytes of a last
        line without its newline yet."""
        identity, size = (stat.st_dev, stat.st_ino), stat.st_size
        if identity != self._identity or size < self._offset or handle.read(len(self._head)) != self._head:
            self._restart(handle, identity, 0)
        if size - self._offset > TAIL:
            self._restart(handle, identity, size - TAIL)
        handle.seek(self._offset)
        position, carry = self._offset, b""
        while position < size and (chunk := handle.read(min(_CHUNK, size - position))):
            position += len(chunk)
            if self._skipping:
                newline = chunk.find(b"\n")
                if newline < 0:
                    continue
                chunk, self._skipping = chunk[newline + 1 :], False
            data = carry + chunk
            whole = data.rfind(b"\n") + 1
            if whole:
                self._parser.feed(data[:whole].decode("utf-8", "replace"))
            carry = data[whole:]
            if len(carry) > LONG_LINE:
                carry, self._skipping = b"", True
        self._offset = position - len(carry)
        return carry

    def _restart(self, handle: BinaryIO, identity: tuple[int, int], offset: int) -> None:
        handle.seek(0)
        self._head = handle.read(_HEAD)
        self._identity, self._offset, self._parser = identity, offset, ServerLogParser()
        self._skipping = self._cut = offset > 0


def run_log_command(argv: Sequence[str], timeout: float) -> tuple[str, str]:
    """(stdout, stderr) of a command that prints the log, run without a shell in a session of its own; only the
    last OUTPUT_TAIL bytes of each are kept. LogUnavailable (with its stderr or exit status) when it cannot run,
    fails or outlasts `timeout` seconds. Its whole process group is killed when it ends or times out, so no
    background child of it outlives the read."""
    shown = shlex.join(argv)
    deadline = time.monotonic() + timeout
    if not _COMMANDS.acquire(timeout=timeout):
        raise LogUnavailable(f"ollama_log: `{shown}` did not start within {timeout:g} s ({_AT_ONCE} commands running)")
    try:
        return _run_command(argv, shown, timeout, deadline)
    finally:
        _COMMANDS.release()


def _run_command(argv: Sequence[str], shown: str, timeout: float, deadline: float) -> tuple[str, str]:
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        words = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise LogUnavailable(f"ollama_log: cannot run `{shown}`: {words}") from None
    try:
        stdout, stderr, finished = _read_tails(process, deadline)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # the leader is not reaped yet: its group id is still its own
        process.wait()
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    if not finished:
        raise LogUnavailable(f"ollama_log: `{shown}` did not finish within {timeout:g} s")
    out, err = stdout.text(), stderr.text()
    if process.returncode != 0:
        said = _last_line(err)
        code = process.returncode
        status = f"exit status {code}" if code > 0 else f"signal {-code}"
        raise LogUnavailable(f"ollama_log: `{shown}` failed ({status})" + (f": {said}" if said else ""))
    return out, err


class _Tail:
    """The last OUTPUT_TAIL bytes (at least) of a stream, from its first whole line once older ones are dropped."""

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.cut = False

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        while self.size - len(self.chunks[0]) >= OUTPUT_TAIL:
            self.size -= len(self.chunks.popleft())
            self.cut = True

    def text(self) -> str:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return str(memoryview(data)[data.find(b"\n") + 1 if self.cut else 0 :], "utf-8", "replace")


def _read_tails(process: subprocess.Popen[bytes], deadline: float) -> tuple[_Tail, _Tail, bool]:
    """The tails of the process's stdout and stderr, read until it has exited and left nothing more to read (a
    background child may hold the pipes open); False when the deadline came first. The process is not reaped
    (a pidfd, or where there is none `waitid(WNOWAIT)` every 50 ms, tells its exit), so its group can still be
    killed by its id."""
    assert process.stdout is not None and process.stderr is not None
    tails = {pipe.fileno(): _Tail() for pipe in (process.stdout, process.stderr)}
    out, err = tails.values()
    try:
        pidfd: int | None = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # before Linux 5.3, or a sandbox that forbids it
        pidfd = None
    exited = False
    try:
        with selectors.DefaultSelector() as selector:
            for fd in (*tails, *([pidfd] if pidfd is not None else [])):
                selector.register(fd, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                wait = 0 if exited else left if pidfd is not None else min(left, 0.05)
                ready = [key.fd for key, _ in selector.select(wait)]
                if pidfd in ready or (pidfd is None and not exited and _exited(process.pid)):
                    exited = True
                    if pidfd is not None:
                        selector.unregister(pidfd)
                pipes = [fd for fd in ready if fd != pidfd]
                for fd in pipes:
                    chunk = os.read(fd, _CHUNK)
                    if chunk:
                        tails[fd].add(chunk)
                    else:
                        selector.unregister(fd)
                if exited and not pipes:
                    return out, err, True
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return out, err, False


def _exited(pid: int) -> bool:
    """True when the process has exited; it is left unreaped."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def command_capacity(argv: Sequence[str], timeout: float) -> Capacity:
    """The capacity a command's output states: its stdout, then its stderr (`docker logs` passes Ollama's log,
    written to stderr, on its stderr); the last stderr line joins the reason when the output states none."""
    shown = f"`{shlex.join(argv)}`"
    try:
        stdout, stderr = run_log_command(argv, timeout)
    except LogUnavailable as exc:
        return Capacity(source="unknown", reason=str(exc))
    capacity = log_capacity(ServerLogParser().feed(stdout).feed(stderr).log, shown)
    said = _last_line(stderr)
    if not capacity.known and said:
        return replace(capacity, reason=f"{capacity.reason} (stderr: {said})")
    return capacity


def file_capacity(log: LogFile) -> Capacity:
    try:
        return log_capacity(log.read(), log.where)
    except LogUnavailable as exc:
        return Capacity(source="unknown", reason=str(exc))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""
