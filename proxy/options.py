"""What the proxy sets in a request's body before it goes to a node (only on Ollama's native API: the OpenAI
API carries no runner options).

- The resident runner's num_ctx when the request sets none (Ollama would otherwise compare the node's
  default with the runner's and reload), or the priority model's configured num_ctx for a load it causes.
- The resident runner's options in place of the request's when loading as asked would evict a priority or
  busy model (`adjusted`: the caller adds a header, a log line and a metric).
- A priority model's configured keep_alive on its pinned copy (its first copy fully on GPU, or a load while it
  has none): a client cannot unpin it through the proxy. Another copy keeps the client's keep_alive: pinned
  forever, every extra copy the proxy loads would stay loaded for good.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gpurouter.cluster.config import PriorityModel
from gpurouter.cluster.state import ClusterState
from gpurouter.decide.route.ask import RUNNER_OPTIONS
from gpurouter.decide.route.pipeline import Target

NATIVE = frozenset(("/api/generate", "/api/chat", "/api/embed", "/api/embeddings"))


def changes(data: Mapping[str, Any], target: Target, priority: PriorityModel | None) -> dict[str, Any] | None:
    """The body to send instead of the client's, or None to send it unchanged."""
    options = data.get("options") if isinstance(data.get("options"), dict) else {}
    new = dict(options)
    if target.adjusted:
        for key in RUNNER_OPTIONS:
            new.pop(key, None)
    for key, value in target.sets.items():
        if value is not None and key not in new:
            new[key] = value
    keep = priority is not None and data.get("keep_alive") != priority.keep_alive
    if new == options and not keep:
        return None
    body = dict(data)
    body["options"] = new
    if priority is not None:
        body["keep_alive"] = priority.keep_alive
    return body


def pin_for(state: ClusterState | None, model: str, node: str, priority: PriorityModel | None) -> PriorityModel | None:
    """The priority model whose keep_alive the request to `node` carries: None for a model that is not one, or
    when another node holds its first copy fully on GPU (the pinned one, as the optimizer pins it)."""
    if priority is None or state is None:
        return priority
    homes = state.gpu_copies(model)
    return priority if not homes or homes[0][0].name == node else None


def body_for(path: str, raw: bytes, data: Mapping[str, Any], target: Target, priority: PriorityModel | None) -> bytes:
    """The bytes to send `target` for a request to `path`."""
    if path not in NATIVE:
        return raw
    body = changes(data, target, priority)
    return raw if body is None else json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
