"""One completion on a runner, timed as llama-server runs it: the prompt's uncached tokens at the prefill rate,
then one token at a time at the runner's rate, shared with the other runners generating on its GPU.

`answer` decides what the model says (plain words, JSON under a `format`, or a tool call); `run` yields
{"token": piece}… then the final counters, or {"error": message} when the runner or the node goes away.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from simulator.fleet import NodeSpec
from simulator.gpushare import GpuShare
from simulator.prompt import Tokens, tokenize
from simulator.scheduler import Runner
from simulator.slots import Lease
from simulator.structured import json_answer, tool_call

RUNNER_GONE = "llama runner process has terminated: signal: killed"
DEFAULT_TOKENS = 24  # tokens of a plain answer when num_predict is not set
CACHED_COUNTED = (0, 30, 1)  # from this version prompt_eval_count counts cached + new tokens, before only new ones
# the words of a plain answer, in turn (its first word loses its space)
_WORDS = (
    " The", " simulated", " node", " answers", " with", " plain", " words", ",", " one", " token", " at",
    " a", " time", ".", " It", " keeps", " the", " model", " busy", " while", " it", " streams", ".",
)  # fmt: skip


@dataclass(frozen=True)
class Answer:
    """What the model generates: `pieces` (one per token), and the tool calls they encode, if any."""

    pieces: tuple[str, ...]
    truncated: bool = False  # num_predict ended it
    tool_calls: tuple[dict[str, Any], ...] = field(default=())

    @property
    def text(self) -> str:
        return "" if self.tool_calls else "".join(self.pieces)


def _words(seed: str, count: int) -> tuple[str, ...]:
    start = hashlib.sha256(seed.encode()).digest()[0]
    words = [_WORDS[(start + i) % len(_WORDS)] for i in range(count)]
    return tuple(w if i else w.lstrip() for i, w in enumerate(words))


def _call_id(seed: str) -> str:
    """Ollama's tool call ID shape ("call_" and 8 of [a-z0-9]), derived from the prompt."""
    digest = hashlib.sha256(seed.encode()).digest()
    return "call_" + "".join("abcdefghijklmnopqrstuvwxyz0123456789"[b % 36] for b in digest[:8])


def answer(
    prompt: str,
    predict: int,
    context: int,
    format_value: object = None,
    tools: Sequence[Any] = (),
    last_message: Mapping[str, Any] | None = None,
) -> Answer:
    """The model's answer to a rendered `prompt`: a tool call when tools are offered (unless the last message
    is a tool's result: then the model answers in words), JSON under `format`, else plain words; at most
    `predict` tokens (when > 0) and never more than the context."""
    limit = min(predict, context) if predict > 0 else context
    if tools and (last_message or {}).get("role") != "tool":
        called = tool_call(tools, str((last_message or {}).get("content") or ""))
        if called is not None:
            name, arguments = called
            calls = ({"id": _call_id(prompt), "function": {"index": 0, "name": name, "arguments": arguments}},)
            pieces = tokenize(json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False))
            return Answer(pieces[:limit], len(pieces) > limit, calls if len(pieces) <= limit else ())
    if format_value not in (None, ""):
        pieces = tokenize(json_answer(format_value, prompt))
        return Answer(pieces[:limit], len(pieces) > limit)
    if predict > 0:
        return Answer(_words(prompt, limit), True)
    return Answer(_words(prompt, min(DEFAULT_TOKENS, context)))


class Generation:
    """Runs completions on one node's runners: its rates, its GPUs' shared throughput, its clock."""

    def __init__(self, spec: NodeSpec, version: tuple[int, ...], sleep: Callable[[float], bool]) -> None:
        self.spec = spec
        self.version = version
        self.sleep = sleep  # False when the node stops during the wait
        self.gpus = GpuShare(spec.gpu_capacity)

    def run(self, runner: Runner, lease: Lease, prompt: Tokens, reply: Answer) -> Iterator[dict]:
        """Prefill the uncached part of the prompt, then generate `reply` piece by piece; the final event holds
        Ollama's counters (prompt_eval_count: cached + new tokens from v0.30.1, only the new ones before)."""
        share = runner.size_vram / runner.size if runner.size else 0.0
        prefill = self.spec.prefill(share)
        prompt_ns = int(lease.computed / prefill * 1e9) if prefill else 0
        if (prompt_ns and not self.sleep(prompt_ns / 1e9)) or not runner.alive:
            yield {"error": RUNNER_GONE}
            return
        own = self.spec.rate(share)
        gpus = tuple(runner.per_gpu)
        key = id(runner)
        self.gpus.begin(key, gpus, own)
        eval_start = time.monotonic()
        try:
            for piece in reply.pieces:
                rate = self.gpus.rate(key, gpus, own)
                if (rate and not self.sleep(1 / rate)) or not runner.alive:
                    yield {"error": RUNNER_GONE}
                    return
                yield {"token": piece}
        finally:
            self.gpus.end(key, gpus)
        counted = lease.reused + lease.computed if self.version >= CACHED_COUNTED else lease.computed
        yield {
            "done_reason": "length" if reply.truncated else "stop",
            "prompt_eval_count": counted,
            "prompt_eval_duration": prompt_ns,
            "eval_count": len(reply.pieces),
            "eval_duration": int((time.monotonic() - eval_start) * 1e9),
        }

    @staticmethod
    def cached(prompt: str, generated: Sequence[str], context: int) -> Tokens:
        """What a slot holds after a request: the prompt and the tokens generated, at most the context."""
        return tokenize(prompt + "".join(generated))[:context]
