"""The README says what the code does: the proxy's defaults as `ProxySettings` has them, and how each Ollama
client finds the proxy and sends its token, as the installed `ollama` package reads them."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

from gpurouter.cluster.config import ProxySettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _commented_default(key: str) -> str:
    """The `(default N` that the README's proxy example states for `key` (its comment may go on a line)."""
    block = README.split("```yaml\nproxy:\n", 1)[1].split("```", 1)[0]
    entry = re.search(rf"^  {key}:.*(?:\n {{20,}}#.*)*", block, flags=re.M)
    assert entry is not None, key
    found = re.search(r"\(default (\S+?)[:)]", entry.group())
    assert found is not None, f"the README's proxy example states no default for {key}"
    return found.group(1)


def test_the_proxy_example_states_the_real_defaults():
    for key in ("refresh_interval", "wait_for_gpu"):
        assert _commented_default(key) == f"{getattr(ProxySettings(), key):g}", key


def test_the_clients_find_the_proxy_and_send_the_token_as_the_readme_says():
    source = inspect.getsource(importlib.import_module("ollama._client").BaseClient.__init__)  # the module
    assert "OLLAMA_HOST" in source and "OLLAMA_API_KEY" in source and "Bearer" in source
    assert "the official clients" not in README  # the JavaScript client reads no environment variable
    assert "sends `OLLAMA_API_KEY` as `Authorization: Bearer …`" in README
    assert 'new Ollama({host: "http://127.0.0.1:11435", headers: {Authorization:' in README
