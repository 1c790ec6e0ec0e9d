"""What the simulator's prompt cache and shared GPU cost, at the demo cluster's rates (gpu-large: 60 tokens/s,
prefill 2400 tokens/s).

1. A conversation with a long system prompt, turn after turn: time to the first token with the prompt cached
   (the same prefix every turn) against the same turns with the cache defeated (a timestamp put first, as
   apps that rewrite their prompt do). Goal: cached turns reach their first token in ≤ 20 % of the time.
2. Two models generating at once on the one GPU: their summed token rate against the GPU's 60 tokens/s.
   Goal: within 10 % of it (neither runs at its full rate).

Run: `python bench/prompt_cache.py [--turns 4]`.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from simulator.run import Fleet, fleet_from_dict  # noqa: E402

RATE = 60.0
NODE = {
    "name": "gpu-large",
    "gpus": [{"name": "NVIDIA GeForce RTX 3070", "vram": "8GiB"}],
    "ram": "32GiB",
    "models": ["llama3.2:1b", "llama3.2:3b"],
    "token_rate": RATE,
    "cpu_token_rate": 8,
}
SYSTEM = "You are a support agent for a GPU cluster. Answer briefly and cite the runbook. " * 40


def first_token_seconds(url: str, messages: list[dict]) -> tuple[float, dict]:
    """Seconds to the first streamed chunk, and the final chunk."""
    body = {"model": "llama3.2:1b", "messages": messages, "options": {"num_predict": 8}}
    started = time.monotonic()
    first = None
    with requests.post(f"{url}/api/chat", json=body, stream=True, timeout=60) as reply:
        for line in reply.iter_lines():
            if line and first is None:
                first = time.monotonic() - started
            final = line
    return first or 0.0, json.loads(final)


def conversation(url: str, turns: int, rewrite: bool) -> list[float]:
    messages: list[dict] = []
    times = []
    for turn in range(turns):
        system = (f"Now: {time.time_ns()}. " if rewrite else "") + SYSTEM
        messages = [{"role": "system", "content": system}, *messages[1:]]
        messages.append({"role": "user", "content": f"Question {turn}: is node {turn} healthy?"})
        seconds, final = first_token_seconds(url, messages)
        messages.append({"role": "assistant", "content": "ok"})
        print(
            f"  turn {turn}: first token {seconds * 1000:7.1f} ms, prompt_eval_count {final['prompt_eval_count']:5d}, "
            f"prompt_eval_duration {final['prompt_eval_duration'] / 1e6:7.1f} ms"
        )
        times.append(seconds)
    return times


def shared_gpu(url: str, tokens: int = 60) -> float:
    """Summed tokens per second of two models generating at once on the node's one GPU."""
    for model in ("llama3.2:1b", "llama3.2:3b"):
        requests.post(f"{url}/api/generate", json={"model": model, "prompt": "", "keep_alive": -1}, timeout=60)
    finals: list[dict] = []

    def generate(model: str) -> None:
        body = {"model": model, "prompt": "go", "stream": False, "options": {"num_predict": tokens}}
        finals.append(requests.post(f"{url}/api/generate", json=body, timeout=60).json())

    threads = [threading.Thread(target=generate, args=(m,)) for m in ("llama3.2:1b", "llama3.2:3b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    rates = [f["eval_count"] / (f["eval_duration"] / 1e9) for f in finals]
    print(f"  each: {', '.join(f'{r:.1f}' for r in rates)} tokens/s; sum {sum(rates):.1f} (GPU {RATE:.0f})")
    return sum(rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--turns", type=int, default=4)
    args = parser.parse_args()
    with Fleet(fleet_from_dict({"nodes": [NODE]})) as fleet:
        url = fleet.urls["gpu-large"]
        requests.post(f"{url}/api/generate", json={"model": "llama3.2:1b", "prompt": ""}, timeout=60)
        print("prompt cached (same prefix every turn):")
        cached = conversation(url, args.turns, rewrite=False)
        print("cache defeated (a timestamp first):")
        rewritten = conversation(url, args.turns, rewrite=True)
        print("two models generating at once on one GPU:")
        total = shared_gpu(url)
    later_cached, later_rewritten = sum(cached[1:]), sum(rewritten[1:])
    ratio = later_cached / later_rewritten
    print(f"goal cached turns' first token ≤ 20 % of uncached: {'MET' if ratio <= 0.2 else 'MISSED'} ({ratio:.0%})")
    close = abs(total - RATE) <= 0.1 * RATE
    print(f"goal two runners share the GPU's {RATE:.0f} tokens/s (±10 %): {'MET' if close else 'MISSED'} ({total:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
