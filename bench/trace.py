"""Replay one seeded trace through several routers on the same simulated fleet, and compare what clients get.

The fleet is heterogeneous (gpu-a 24 GiB fast, gpu-b 12 GiB, gpu-c 8 GiB slow, a CPU node; two slots a GPU
runner, one on CPU); every GPU node has every model installed, the CPU node the small ones; the priority
models (mxbai-embed-large, llama3.1:8b) start pinned on GPU, and the popular small models have a copy on two
or three GPUs (replicas: a router has a choice to make). The trace (seeded, bounded, prefix-heavy):
`--clients` clients, each sending `--requests` requests in multi-turn chats that share one of two long system
prompts (about 3700 tokens), some with a RAG document first, over six chat models picked by Zipf popularity
that shifts halfway, plus embedding requests; all clients start at once (a burst) and think briefly between
chats. Every variant gets a fresh copy of the same fleet and the same trace.

`--scenario routing` (the default): round-robin over the nodes that have the model (a plain load balancer),
least connections (the node with the fewest requests in flight), the proxy with its new scorers off
(residency, then requests in flight), the proxy as configured by default (no optimizer runs in these: the
same healing, none), and the proxy beside an optimizer with placement from demand. Goals on the same run: TTFT
p50 ≥ 2× better than round-robin and ≥ 1.5× better than least connections; ≥ 95 % of tokens generated fully
on GPU; no eviction of a priority model.

`--scenario demand`: the proxy beside an optimizer (healing the priority models every 2 s) with placement from
demand off, then on, on a time scale of seconds (DEMAND: a 20 s window, a pass a second, keep_alive 60 s),
where the nodes' own keep_alive is 8 s (Ollama's 5 minutes on that scale, the preloaded chat models' too),
and every client pauses `--gap` seconds after every 4 requests. Goals: ≥ 98 % of the
tokens of every client's last quarter of requests (once the shift has settled) generated fully on GPU; loads
at most 2× the minimum a clairvoyant placement must make (one per model asked for with no GPU copy at the
start).

Per variant: time to first token p50/p95 (chat requests), median tokens/s (generated tokens ÷ request time),
share of generated tokens generated fully on GPU (all, and once settled), share of prompt tokens served from
a prompt cache (the simulator's own count), loads and unloads (and per hour), seconds a priority model was
fully on GPU nowhere, unloads of a pinned priority model (an eviction: they are pinned).

Every node loads a model at `--load-speed` bytes a second (default 2GiB, a page cache or a fast disk: a load
takes seconds, as on real nodes), for every variant alike; `--load-speed 0` makes loads instant (the
simulator's own default), which makes the plain balancers' hundreds of loads and evictions free.

Run: `python bench/trace.py [--scenario routing|demand] [--clients 12] [--requests 24] [--seed 7]
[--load-speed 2GiB] [--gap 12]` (several minutes).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpurouter.cluster.config import parse_config  # noqa: E402
from optimizer.service import start_optimizer  # noqa: E402
from proxy.service import start_proxy  # noqa: E402
from simulator.run import Fleet, fleet_from_dict  # noqa: E402

CHAT = ["llama3.1:8b", "llama3.2:3b", "llama3.2:1b", "qwen2.5-coder:1.5b", "qwen2.5-coder:3b", "codellama:7b"]
EMBED = "mxbai-embed-large:latest"
PRIORITY = (EMBED, "llama3.1:8b")
MODELS = [*CHAT, "mxbai-embed-large"]
# placement from demand on the trace's time scale (a minute or two): 20 s stand for 10 minutes, 60 s for 30
DEMAND = {"window": 20, "interval": 1, "keep_alive": "60s"}
NODE_KEEP_ALIVE = "8s"  # the demand scenario's stand-in for Ollama's 5 minutes, on the same scale
NODES = [
    {
        "name": "gpu-a",
        "gpus": [{"name": "RTX 4090", "vram": "24GiB"}],
        "token_rate": 120,
        "num_parallel": 2,
        "preload": [
            {"model": "llama3.1:8b", "keep_alive": -1},
            *({"model": m, "keep_alive": "1h"} for m in ("llama3.2:3b", "qwen2.5-coder:1.5b", "llama3.2:1b")),
        ],
    },
    {
        "name": "gpu-b",
        "gpus": [{"name": "RTX 3060", "vram": "12GiB"}],
        "token_rate": 80,
        "num_parallel": 2,
        "preload": [
            {"model": "mxbai-embed-large", "keep_alive": -1},
            *({"model": m, "keep_alive": "1h"} for m in ("llama3.2:3b", "qwen2.5-coder:1.5b", "llama3.2:1b")),
        ],
    },
    {
        "name": "gpu-c",
        "gpus": [{"name": "RTX 3070", "vram": "8GiB"}],
        "token_rate": 50,
        "num_parallel": 2,
        "preload": [{"model": m, "keep_alive": "1h"} for m in ("llama3.2:3b", "llama3.2:1b")],
    },
    {
        "name": "cpu",
        "models": ["llama3.2:1b", "qwen2.5-coder:1.5b", "mxbai-embed-large"],  # the small ones only
        "cpu_token_rate": 10,
        "cpu_prefill_rate": 400,
        "num_parallel": 1,
        "ram": "64GiB",
    },
]
SYSTEMS = [
    "You are the support assistant of a GPU cluster. Answer briefly, cite the runbook section, never guess. " * 150,
    "You review Python code for a platform team: point out bugs first, then style, with line numbers. " * 150,
]
DOCS = [f"Runbook chapter {i}: " + f"step {i} checks the node's GPU memory and its Ollama log. " * 50 for i in range(6)]


@dataclass
class Outcome:
    model: str
    ttft: float | None
    seconds: float
    generated: int
    node: str
    on_gpu: bool
    error: str | None = None
    settled: bool = False  # in the last quarter of its client's requests: after the shift has settled


@dataclass
class Variant:
    name: str
    pick: Callable[[str], tuple[str, str | None]]  # model → (base URL, node name or None: told by the answer)
    done: Callable[[str | None], None] = lambda node: None
    outcomes: list[Outcome] = field(default_factory=list)


def settled(index: int, per_client: int) -> bool:
    """A client's request `index` comes after the popularity shift (halfway) has settled (a quarter more)."""
    return index >= per_client * 3 // 4


def trace(seed: int, clients: int, per_client: int) -> list[list[tuple[str, dict]]]:
    """Per client, its requests in order: (path, body)."""
    plans = []
    for client in range(clients):
        rng = random.Random(seed * 1000 + client)
        out: list[tuple[str, dict]] = []
        while len(out) < per_client:
            ranking = CHAT[::-1] if len(out) >= per_client // 2 else CHAT  # popularity shifts halfway
            model = rng.choices(ranking, [1 / (rank + 1) ** 1.2 for rank in range(len(ranking))])[0]
            if rng.random() < 0.15:
                out.append(("/api/embed", {"model": EMBED, "input": rng.choice(DOCS)}))
                continue
            messages = [{"role": "system", "content": SYSTEMS[client % 2]}]
            for turn in range(rng.randint(2, 4)):
                doc = rng.choice(DOCS) + "\n\n" if turn == 0 and rng.random() < 0.5 else ""
                messages = [*messages, {"role": "user", "content": f"{doc}Question {client}.{turn}: what next?"}]
                out.append(("/api/chat", {"model": model, "messages": messages, "options": {"num_predict": 24}}))
                messages = [*messages, {"role": "assistant", "content": f"Answer {turn}: check the runbook."}]
                if len(out) >= per_client:
                    break
        plans.append(out)
    return plans


def fleet_spec(load_speed: str = "0", keep_alive: str | None = None) -> dict:
    """The fleet; `load_speed`: bytes of a model per second a node loads (the simulator's; 0 = at once);
    `keep_alive`: the nodes' default, which the preloaded chat models then have too (when None, Ollama's 5
    minutes, and the chat models are preloaded for an hour)."""
    if not keep_alive:
        return {"nodes": [{"models": MODELS, "load_speed": load_speed, **n} for n in NODES]}
    nodes = []
    for n in NODES:  # the preloaded chat models as clients left them: with the nodes' own keep_alive
        preload = [p if p["keep_alive"] == -1 else {"model": p["model"]} for p in n.get("preload", [])]
        nodes.append({"models": MODELS, "load_speed": load_speed, **n, "keep_alive": keep_alive, "preload": preload})
    return {"nodes": nodes}


def installed(model: str) -> list[str]:
    """The nodes that have `model`."""
    key = model if ":" in model else f"{model}:latest"
    return [n["name"] for n in fleet_spec()["nodes"] if {key, key.removesuffix(":latest")} & set(n["models"])]


class Watch:
    """While a variant runs: seconds each priority model is fully on GPU nowhere, and unloads of priority
    models (pinned: every unload is an eviction or a reload)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.off_gpu = 0.0
        self.evictions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._handler = _UnloadCounter(self)

    def __enter__(self) -> Watch:
        logging.getLogger("gpu_router.simulator").addHandler(self._handler)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        logging.getLogger("gpu_router.simulator").removeHandler(self._handler)

    def _sample(self) -> None:
        step = 0.25
        while not self._stop.wait(step):
            for model in PRIORITY:
                if not any(on_gpu(self.fleet, node, model) for node in self.fleet.urls):
                    self.off_gpu += step


class _UnloadCounter(logging.Handler):
    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        unload = "event=simulator.unload" in text and "reason=keep_alive" not in text
        if unload and any(f"model={m}" in text for m in PRIORITY):
            self.watch.evictions += 1


def on_gpu(fleet: Fleet, node: str, model: str) -> bool:
    want = model if ":" in model else f"{model}:latest"
    for m in fleet.node(node).scheduler.snapshot():
        if m.name in (model, want):
            return m.size > 0 and m.size_vram >= m.size
    return False


def send(fleet: Fleet, variant: Variant, path: str, body: dict, late: bool = False) -> Outcome:
    url, node = variant.pick(body["model"])
    started = time.monotonic()
    ttft = None
    generated = 0
    error = None
    try:
        with requests.post(url + path, json=body, stream=True, timeout=300) as reply:
            node = node or reply.headers.get("X-GPU-Router-Node")
            if reply.status_code != 200:
                error = f"{reply.status_code} {reply.text[:200]}"
            for line in reply.iter_lines():
                if not line:
                    continue
                if ttft is None and path == "/api/chat" and b'"content":""' not in line:
                    ttft = time.monotonic() - started
                if b'"done":true' in line:
                    generated = (
                        int(line.split(b'"eval_count":')[1].split(b",")[0].rstrip(b"}")) if b"eval_count" in line else 0
                    )
    finally:
        variant.done(node)
    seconds = time.monotonic() - started
    ran_on_gpu = node in fleet.urls and on_gpu(fleet, node, body["model"])
    return Outcome(body["model"], ttft, seconds, generated, node or "", ran_on_gpu, error, late)


def run_variant(
    name: str,
    make: Callable[[Fleet], tuple[Variant, Callable[[], None]]],
    plans: list,
    load_speed: str = "0",
    gaps: tuple[int, float] | None = None,
) -> dict:
    """One variant on a fresh fleet; `gaps` (every, seconds): each client pauses that long after every `every`
    requests (quiet gaps: the demand scenario's nodes have a short keep_alive)."""
    keep_alive = NODE_KEEP_ALIVE if gaps else None
    with Fleet(fleet_from_dict(fleet_spec(load_speed, keep_alive))) as fleet:
        variant, close = make(fleet)
        try:
            before = {n: fleet.node(n).state() for n in fleet.urls}
            with Watch(fleet) as watch:
                started = time.monotonic()

                def client(plan: list[tuple[str, dict]], index: int) -> None:
                    rng = random.Random(index)
                    for i, (path, body) in enumerate(plan):
                        variant.outcomes.append(send(fleet, variant, path, body, settled(i, len(plan))))
                        time.sleep(rng.uniform(0.0, 0.3))  # a client thinking: the trace's own pacing
                        if gaps and (i + 1) % gaps[0] == 0:
                            time.sleep(gaps[1])

                threads = [threading.Thread(target=client, args=(p, i)) for i, p in enumerate(plans)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.monotonic() - started
            after = {n: fleet.node(n).state() for n in fleet.urls}
        finally:
            close()
    return {
        **summary(name, variant.outcomes, before, after, watch, wall),
        "minimum_loads": minimum_loads(plans, before),
    }


def summary(name: str, outcomes: list[Outcome], before: dict, after: dict, watch: Watch, wall: float) -> dict:
    ttfts = sorted(o.ttft for o in outcomes if o.ttft is not None)
    rates = [o.generated / o.seconds for o in outcomes if o.generated and o.seconds > 0]
    tokens = sum(o.generated for o in outcomes)
    gpu_tokens = sum(o.generated for o in outcomes if o.on_gpu)
    late = sum(o.generated for o in outcomes if o.settled)
    late_gpu = sum(o.generated for o in outcomes if o.settled and o.on_gpu)

    def total(state: dict, key: str) -> int:
        return sum(c.get(key, 0) for c in state["counts"].values())

    def prompt(state: dict, key: str) -> int:
        return state["prompt_tokens"][key]

    cached = sum(prompt(after[n], "cached") - prompt(before[n], "cached") for n in after)
    computed = sum(prompt(after[n], "computed") - prompt(before[n], "computed") for n in after)
    return {
        "variant": name,
        "requests": len(outcomes),
        "errors": [o.error for o in outcomes if o.error],
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[int(0.95 * (len(ttfts) - 1))],
        "tokens_per_s": statistics.median(rates) if rates else 0.0,
        "gpu_share": gpu_tokens / tokens if tokens else 0.0,
        "settled_gpu_share": late_gpu / late if late else 0.0,
        "cached_share": cached / (cached + computed) if cached + computed else 0.0,
        "loads": sum(total(after[n], "loads") - total(before[n], "loads") for n in after),
        "unloads": sum(total(after[n], "unloads") - total(before[n], "unloads") for n in after),
        "priority_off_gpu_s": watch.off_gpu,
        "priority_evictions": watch.evictions,
        "wall_s": wall,
    }


def direct(kind: str) -> Callable[[Fleet], tuple[Variant, Callable[[], None]]]:
    """Clients that pick a node themselves: round-robin, or least connections."""

    def make(fleet: Fleet) -> tuple[Variant, Callable[[], None]]:
        names = list(fleet.urls)
        turns = {m: itertools.cycle(installed(m)) for m in [*CHAT, EMBED]}
        busy = dict.fromkeys(names, 0)
        lock = threading.Lock()

        def pick(model: str) -> tuple[str, str | None]:
            with lock:
                there = installed(model)
                node = next(turns[model]) if kind == "rr" else min(there, key=lambda n: (busy[n], names.index(n)))
                busy[node] += 1
            return fleet.urls[node], node

        def done(node: str | None) -> None:
            with lock:
                if node in busy:
                    busy[node] -= 1

        return Variant(kind, pick, done), lambda: None

    return make


def proxied(weights: dict | None, demand: bool | None = None) -> Callable[[Fleet], tuple[Variant, Callable[[], None]]]:
    """The proxy over the fleet; with `demand` not None, an optimizer beside it that heals the priority models
    (a reconcile pass every 2 s) and, when `demand`, places models from the proxy's demand (DEMAND)."""

    def make(fleet: Fleet) -> tuple[Variant, Callable[[], None]]:
        vram = {n["name"]: n["gpus"][0]["vram"] if n.get("gpus") else 0 for n in NODES}
        proxy_settings: dict = {"refresh_interval": 0.5}
        if weights is not None:
            proxy_settings["weights"] = weights
        base = {
            "nodes": [
                {"name": n, "url": u, "vram": vram[n], "num_parallel": 1 if n == "cpu" else 2}
                for n, u in fleet.urls.items()
            ],
            "priority_models": list(PRIORITY),
            "auto_optimize": demand is not None,
            "proxy": proxy_settings,
            "demand": DEMAND,
        }
        handle = start_proxy(parse_config(base), heal=False)
        variant = Variant("proxy", lambda model: (handle.url, None))
        if demand is None:
            return variant, handle.stop
        settings = {**DEMAND, "placement": demand, "proxy_url": handle.url}
        optimizer = start_optimizer(parse_config({**base, "check_interval": 2, "demand": settings}))

        def close() -> None:
            optimizer.stop()
            handle.stop()

        return variant, close

    return make


def minimum_loads(plans: list, before: dict) -> int:
    """The loads a clairvoyant placement must make at least: one for each model the trace asks for that has no
    copy fully on GPU at the start (every GPU node has every model; the fleet holds all of them at once)."""
    asked = {body["model"] for plan in plans for _, body in plan}
    resident = {
        m["model"].removesuffix(":latest")
        for state in before.values()
        for m in state["loaded"]
        if m["size_vram"] >= m["size"] > 0
    }
    return len({m.removesuffix(":latest") for m in asked} - resident)


def show(r: dict) -> None:
    print(
        f"{r['variant']}\n    TTFT p50 {r['ttft_p50']:6.2f} s  p95 {r['ttft_p95']:6.2f} s  "
        f"median {r['tokens_per_s']:6.1f} tokens/s  on GPU {r['gpu_share']:5.1%} "
        f"(settled {r['settled_gpu_share']:5.1%})  cached {r['cached_share']:5.1%}  "
        f"loads {r['loads']:3d} ({r['loads'] / r['wall_s'] * 3600:.0f}/h)  "
        f"unloads {r['unloads']:3d} ({r['unloads'] / r['wall_s'] * 3600:.0f}/h)  priority off GPU "
        f"{r['priority_off_gpu_s']:5.1f} s  priority evictions {r['priority_evictions']}  "
        f"({r['requests']} requests, {len(r['errors'])} failed, {r['wall_s']:.0f} s)",
        flush=True,
    )


def routing(plans: list, load_speed: str) -> None:
    """The request pipeline against plain load balancers (issue 19's goals)."""
    variants = [
        ("round-robin", direct("rr")),
        ("least-connections", direct("lc")),
        ("proxy, scorers off", proxied({"residency": 4, "queue": 0.01, "latency": 0, "affinity": 0, "speed": 0})),
        ("proxy", proxied(None)),
        ("proxy + optimizer, placement from demand on", proxied(None, demand=True)),
    ]
    rows = []
    for name, make in variants:
        rows.append(run_variant(name, make, plans, load_speed))
        show(rows[-1])
    for r in rows:
        for error in sorted(set(r["errors"]))[:3]:
            print(f"  {r['variant']}: {error}")
    rr, lc, _, new, on = rows
    for label, proxy in (("the proxy", new), ("with placement from demand", on)):
        goals = [
            ("TTFT p50 ≥ 2× better than round-robin", rr["ttft_p50"] / proxy["ttft_p50"], 2.0),
            ("TTFT p50 ≥ 1.5× better than least connections", lc["ttft_p50"] / proxy["ttft_p50"], 1.5),
            ("≥ 95 % of tokens generated fully on GPU", proxy["gpu_share"], 0.95),
        ]
        for what, value, floor in goals:
            print(f"goal ({label}) {what}: {'MET' if value >= floor else 'MISSED'} ({value:.2f})")
        evicted = proxy["priority_evictions"]
        print(f"goal ({label}) no priority model evicted: {'MET' if evicted == 0 else 'MISSED'} ({evicted})")


def demand(plans: list, load_speed: str, gaps: tuple[int, float]) -> None:
    """Placement from demand off against on, on a trace with quiet gaps longer than the nodes' keep_alive
    (issue 23's goals)."""
    variants = [
        ("proxy + optimizer, placement from demand off", proxied(None, demand=False)),
        ("proxy + optimizer, placement from demand on", proxied(None, demand=True)),
    ]
    rows = []
    for name, make in variants:
        rows.append(run_variant(name, make, plans, load_speed, gaps))
        show(rows[-1])
    off, on = rows
    settled = on["settled_gpu_share"]
    print(
        f"goal ≥ 98 % of tokens fully on GPU once the shift settles: {'MET' if settled >= 0.98 else 'MISSED'} "
        f"({settled:.1%}; {off['settled_gpu_share']:.1%} with placement from demand off)"
    )
    least = on["minimum_loads"]
    print(
        f"goal loads within 2× of the clairvoyant minimum: {'MET' if on['loads'] <= 2 * least else 'MISSED'} "
        f"({on['loads']} loads, minimum {least}; {off['loads']} with placement from demand off)"
    )
    print(
        f"placement from demand on against off: TTFT p50 {off['ttft_p50'] / on['ttft_p50']:.2f}× better, "
        f"p95 {off['ttft_p95'] / on['ttft_p95']:.2f}× better"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--scenario", choices=("routing", "demand"), default="routing")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--requests", type=int, default=24, help="requests per client")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--load-speed", default="2GiB", help="how fast a node loads a model (per second; 0: at once; default 2GiB)"
    )
    parser.add_argument(
        "--gap", type=float, default=12.0, help="demand: seconds each client pauses after every 4 requests"
    )
    args = parser.parse_args()
    logging.getLogger("gpu_router.simulator").setLevel(logging.INFO)
    if args.scenario == "routing":
        routing(trace(args.seed, args.clients, args.requests), args.load_speed)
    else:
        demand(trace(args.seed, args.clients, args.requests), args.load_speed, (4, args.gap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
