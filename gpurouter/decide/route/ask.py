"""What a request asks of the router: the model, the runner options it sets, and its prompt as hashed blocks.

The prompt is read in the order Ollama renders it (system, then each message in turn; generate: system, then
prompt) and cut into blocks of BLOCK_CHARS characters; block i's hash covers every block before it, so two
prompts share their first k hashes exactly when they share their first k blocks (a prefix the runner's prompt
cache can reuse). Tokens are estimated at CHARS_PER_TOKEN characters each.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpurouter.cluster.config import model_key

# options fixed when a runner starts: a request with other values reloads the model (reference/ollama-api.md §4.3)
RUNNER_OPTIONS = ("num_ctx", "num_gpu", "num_batch", "main_gpu", "use_mmap", "num_thread")
BLOCK_CHARS = 256  # about 64 tokens: the prompt-cache index's unit
CHARS_PER_TOKEN = 4
MAX_BLOCKS = 8192  # a prompt's first 2 MiB of text count; the rest is not indexed
EMBEDDING_PATHS = frozenset(("/api/embed", "/api/embeddings", "/v1/embeddings"))


@dataclass(frozen=True)
class Ask:
    """One request as the pipeline sees it."""

    model: str  # model_key
    runner: Mapping[str, object] = field(default_factory=dict)  # the runner options it sets (num_gpu -1 = unset)
    blocks: tuple[int, ...] = ()  # chained hashes of its prompt's whole blocks
    prompt_tokens: int = 0  # estimated
    embedding: bool = False  # an embedding request (no prompt cache, one slot)
    openai: bool = False  # through the OpenAI API: no runner option can be set, Ollama uses the node's defaults

    @property
    def num_ctx(self) -> int | None:
        ctx = self.runner.get("num_ctx")
        return ctx if isinstance(ctx, int) and not isinstance(ctx, bool) else None


def runner_options(options: Mapping[str, object]) -> dict[str, object]:
    """The runner options `options` sets; num_gpu -1 is Ollama's "unset"."""
    found = {k: options[k] for k in RUNNER_OPTIONS if options.get(k) is not None}
    if found.get("num_gpu") == -1:
        del found["num_gpu"]
    return found


def _text(content: object) -> str:
    """A message's text: a string, or the text parts of an OpenAI content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def rendered(data: Mapping[str, Any]) -> str:
    """The prompt's text in Ollama's render order (chat messages, or system then prompt)."""
    messages = data.get("messages")
    if isinstance(messages, list):
        return "".join(f"{m.get('role', '')}\n{_text(m.get('content'))}\n" for m in messages if isinstance(m, dict))
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        prompt = "".join(p for p in prompt if isinstance(p, str))
    system = data.get("system")
    return (f"system\n{system}\n" if isinstance(system, str) and system else "") + (
        prompt if isinstance(prompt, str) else ""
    )


def blocks_of(text: str) -> tuple[int, ...]:
    """Chained hashes of the whole blocks of `text` (a last partial block is not cached by block)."""
    hashes = []
    last = 0
    for i in range(0, min(len(text) // BLOCK_CHARS, MAX_BLOCKS) * BLOCK_CHARS, BLOCK_CHARS):
        last = hash((last, text[i : i + BLOCK_CHARS]))
        hashes.append(last)
    return tuple(hashes)


def ask_of(path: str, data: Mapping[str, Any], model: str) -> Ask:
    """The Ask of a parsed request to `path`."""
    options = data.get("options")
    openai = path.startswith("/v1/")
    runner = runner_options(options) if isinstance(options, dict) and not openai else {}
    if path in EMBEDDING_PATHS:
        return Ask(model_key(model), runner, embedding=True, openai=openai)
    text = rendered(data)
    return Ask(model_key(model), runner, blocks_of(text), len(text) // CHARS_PER_TOKEN, openai=openai)
