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

import copy
import json
import os
import re
import shlex
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gpurouter.cluster.state import Capacity, GpuInfo
from gpurouter.units import parse_size

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


class LogFile:
    """One log file, read incrementally: only the lines appended since the last read are parsed. A file that
    was replaced (rotated), shrank, or whose first bytes changed (rewritten in place) is read again from its
    start. Thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._identity: tuple[int, int] | None = None
        self._offset = 0
        self._head = b""  # the file's first bytes when it was read from its start
        self._parser = ServerLogParser()

    def read(self) -> ServerLog:
        """The log as it stands; LogUnavailable when the file cannot be read or is empty."""
        with self._lock:
            try:
                with self.path.open("rb") as handle:
                    stat = os.fstat(handle.fileno())
                    same = (stat.st_dev, stat.st_ino) == self._identity and stat.st_size >= self._offset
                    if not same or handle.read(len(self._head)) != self._head:
                        self._identity, self._offset, self._parser = (stat.st_dev, stat.st_ino), 0, ServerLogParser()
                    handle.seek(self._offset)
                    data = handle.read()
                    if self._offset == 0:
                        self._head = data[:_HEAD]
            except OSError as exc:
                raise LogUnavailable(f"ollama_log: cannot read {self.path}: {exc.strerror or exc}") from None
            if self._offset + len(data) == 0:
                raise LogUnavailable(f"ollama_log: {self.path} is empty")
            whole = data.rfind(b"\n") + 1  # a line still being written is parsed, but parsed again next time
            self._parser.feed(data[:whole].decode("utf-8", "replace"))
            self._offset += whole
            pending = data[whole:].decode("utf-8", "replace")
            return copy.deepcopy(self._parser).feed(pending).log if pending.strip() else self._parser.log


def run_log_command(argv: Sequence[str], timeout: float) -> tuple[str, str]:
    """(stdout, stderr) of a command that prints the log, run without a shell; LogUnavailable (with its
    stderr or exit status) when it cannot run, fails or outlasts `timeout` seconds."""
    shown = shlex.join(argv)
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            text=True,
            errors="replace",
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LogUnavailable(f"ollama_log: `{shown}` did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise LogUnavailable(f"ollama_log: cannot run `{shown}`: {exc.strerror or exc}") from None
    if done.returncode != 0:
        said = _last_line(done.stderr)
        status = f"exit status {done.returncode}" if done.returncode > 0 else f"signal {-done.returncode}"
        raise LogUnavailable(f"ollama_log: `{shown}` failed ({status})" + (f": {said}" if said else ""))
    return done.stdout, done.stderr


def command_capacity(argv: Sequence[str], timeout: float) -> Capacity:
    """The capacity a command's output states: its stdout, then its stderr (`docker logs` passes Ollama's log,
    written to stderr, on its stderr); the last stderr line joins the reason when the output states none."""
    shown = f"`{shlex.join(argv)}`"
    try:
        stdout, stderr = run_log_command(argv, timeout)
    except LogUnavailable as exc:
        return Capacity(source="unknown", reason=str(exc))
    capacity = log_capacity(parse_server_log(f"{stdout}\n{stderr}"), shown)
    said = _last_line(stderr)
    if not capacity.known and said:
        return replace(capacity, reason=f"{capacity.reason} (stderr: {said})")
    return capacity


def file_capacity(log: LogFile) -> Capacity:
    try:
        return log_capacity(log.read(), str(log.path))
    except LogUnavailable as exc:
        return Capacity(source="unknown", reason=str(exc))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""
