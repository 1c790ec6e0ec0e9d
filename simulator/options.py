"""Request `options`: type checks as api.Options.FromMap does them, and the runner options a load uses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

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
    """The options fixed when a runner loads; a request with different ones reloads the model (§4.3)."""

    num_ctx: int
    num_batch: int = 512
    num_gpu: int = -1
    main_gpu: int = 0
    num_thread: int = 0
    use_mmap: bool | None = None

    def needs_reload(self, new: RunnerOptions) -> bool:
        """needsReload: any runner option differs; `num_gpu` is ignored when the new request leaves it -1."""
        return replace(new, num_gpu=self.num_gpu if new.num_gpu < 0 else new.num_gpu) != self


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


def merge_options(node_ctx: int, modelfile_ctx: int | None, request: Mapping[str, object]) -> RunnerOptions:
    """DefaultOptions ← Modelfile ← request: a request num_ctx beats the Modelfile's, which beats the node's."""
    check_options(request)

    def integer(key: str, default: int) -> int:
        value = request.get(key)
        return default if value is None else int(value)  # type: ignore[call-overload]

    use_mmap = request.get("use_mmap")
    return RunnerOptions(
        num_ctx=max(4, integer("num_ctx", modelfile_ctx or node_ctx)),
        num_batch=integer("num_batch", 512),
        num_gpu=integer("num_gpu", -1),
        main_gpu=integer("main_gpu", 0),
        num_thread=integer("num_thread", 0),
        use_mmap=use_mmap if isinstance(use_mmap, bool) else None,
    )


def num_predict(request: Mapping[str, object]) -> int:
    """The request's `num_predict` (already type-checked); -1 when absent."""
    value = request.get("num_predict")
    return -1 if value is None else int(value)  # type: ignore[call-overload]
