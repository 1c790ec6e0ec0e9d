"""Request `options`: type checks as api.Options.FromMap does them, and the runner options a load uses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

_INTS = (
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed", "num_predict", "top_k",
    "repeat_last_n", "mirostat",
)  # fmt: skip
_BOOLS = ("use_mmap", "numa", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock", "penalize_newline")
_FLOATS = (
    "temperature", "top_p", "min_p", "typical_p", "tfs_z", "repeat_penalty", "presence_penalty",
    "frequency_penalty", "mirostat_tau", "mirostat_eta",
)  # fmt: skip


@dataclass(frozen=True)
class RunnerOptions:
    """The options fixed when a runner loads; a request with different ones reloads the model.

    `None` (and -1 for num_gpu) means the request left the option to the server. `auto_ctx`: neither the
    request nor the Modelfile set `num_ctx` (the node's default was used).
    """

    num_ctx: int
    num_batch: int | None = None
    num_gpu: int = -1
    main_gpu: int | None = None
    num_thread: int = 0
    use_mmap: bool | None = None
    auto_ctx: bool = False

    def needs_reload(self, new: RunnerOptions, measured: bool = False) -> bool:
        """needsReload. A request that leaves num_gpu at -1 matches any runner; in the classic era an unset
        num_batch/main_gpu means 512/0. On a llama-server node (`measured`) two automatic contexts are equal
        whatever their value (an out-of-memory retry may have shrunk one), an unset num_batch matches the
        runner's automatic one, and an unset main_gpu differs from a set one."""
        if new.num_gpu >= 0 and new.num_gpu != self.num_gpu:
            return True
        if measured:
            same_ctx = (new.auto_ctx and self.auto_ctx) or new.num_ctx == self.num_ctx
            same_batch = new.num_batch is None or new.num_batch == self.num_batch
            same_gpu = new.main_gpu == self.main_gpu
        else:
            same_ctx = new.num_ctx == self.num_ctx
            same_batch = (new.num_batch or 512) == (self.num_batch or 512)
            same_gpu = (new.main_gpu or 0) == (self.main_gpu or 0)
        same_rest = (new.num_thread, new.use_mmap) == (self.num_thread, self.use_mmap)
        return not (same_ctx and same_batch and same_gpu and same_rest)


def check_options(options: Mapping[str, object]) -> None:
    """ValueError with Ollama's text for a value of the wrong type; unknown keys are ignored."""
    for key, value in options.items():
        if value is None:
            continue
        if key in _INTS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f'option "{key}" must be of type integer')
        if key in _BOOLS and not isinstance(value, bool):
            raise ValueError(f'option "{key}" must be of type boolean')
        if key in _FLOATS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f'option "{key}" must be of type float32')
        if key == "stop":
            if not isinstance(value, list):
                raise ValueError(f'option "{key}" must be of type array')
            if not all(isinstance(item, str) for item in value):
                raise ValueError(f'option "{key}" must be of an array of strings')


def merge_options(
    node_ctx: int, modelfile_ctx: int | None, request: Mapping[str, object], *, node_ctx_set: bool = False
) -> RunnerOptions:
    """DefaultOptions ← Modelfile ← request: a request num_ctx beats the Modelfile's, which beats the node's.
    The context is automatic when none of them sets it and the node's OLLAMA_CONTEXT_LENGTH is unset."""
    check_options(request)

    def integer(key: str) -> int | None:
        value = request.get(key)
        return None if value is None else int(value)  # type: ignore[call-overload]

    use_mmap = request.get("use_mmap")
    ctx, num_gpu = integer("num_ctx"), integer("num_gpu")
    return RunnerOptions(
        num_ctx=max(4, ctx or modelfile_ctx or node_ctx),
        num_batch=integer("num_batch"),
        num_gpu=-1 if num_gpu is None else num_gpu,
        main_gpu=integer("main_gpu"),
        num_thread=integer("num_thread") or 0,
        use_mmap=use_mmap if isinstance(use_mmap, bool) else None,
        auto_ctx=ctx is None and modelfile_ctx is None and not node_ctx_set,
    )


def num_predict(request: Mapping[str, object]) -> int:
    """The request's `num_predict` (already type-checked); -1 when absent."""
    value = request.get("num_predict")
    return -1 if value is None else int(value)  # type: ignore[call-overload]
