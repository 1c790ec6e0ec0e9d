"""Time `gpu-router optimizer`'s exit on SIGTERM while a load is on its way to a node.

A simulated 8 GiB node loads llama3.1:8b in `--load-seconds` (default 60) while the model runs on CPU on
another node; an alert makes the optimizer move it; once the simulator shows the load under way, the optimizer
gets SIGTERM. Prints the exit status, the seconds to exit, and whether the CPU copy still serves the model.
Goal: exit within 5 s, the model still served.

Run: `python bench/sigterm.py [--load-seconds 60] [--runs 3]`.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.localstack import wait_for  # noqa: E402
from simulator.run import Fleet, fleet_from_dict  # noqa: E402

MODEL = "llama3.1:8b"
SIZE = 5024 * 1024 * 1024  # its size on a llama-server node at 4096 tokens


def fleet_spec(load_seconds: float) -> dict:
    node = {"models": [MODEL], "load_speed": int(SIZE / load_seconds), "ram": "32GiB", "token_rate": 0}
    return {
        "nodes": [
            {"name": "gpu-large", "gpus": [{"name": "RTX 3070", "vram": "8GiB"}], **node},
            {"name": "cpu-node", **node, "preload": [{"model": MODEL, "num_gpu": 0, "keep_alive": -1}]},
        ]
    }


def one_run(fleet: Fleet, config: Path) -> tuple[int, float, bool]:
    command = [sys.executable, "-m", "cli.main", "optimizer", "--config", str(config), "--listen", "127.0.0.1:0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        url = ""
        while not url:
            line = process.stderr.readline()
            if not line:
                raise SystemExit("the optimizer did not start")
            match = re.search(r"event=listening url=(\S+)", line)
            url = match.group(1) if match else ""
        alert = {"labels": {"alertname": "GPURouterPriorityModelOnCPU", "model": MODEL, "node": "cpu-node"}}
        body = {"version": "4", "status": "firing", "alerts": [{"status": "firing", **alert}]}
        requests.post(f"{url}/webhook", json=body, timeout=5).raise_for_status()
        loading = fleet.node("gpu-large")
        wait_for(lambda: any(m["loading"] for m in loading.state()["loaded"]), timeout=30, what="the load under way")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    served = requests.post(
        f"{fleet.urls['cpu-node']}/api/generate", json={"model": MODEL, "prompt": "hi", "stream": False}, timeout=30
    )
    return status, took, served.status_code == 200


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    worst = 0.0
    for run in range(1, args.runs + 1):
        with Fleet(fleet_from_dict(fleet_spec(args.load_seconds))) as fleet, tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "gpu_router_config.yaml"
            nodes = [{"name": "gpu-large", "url": fleet.urls["gpu-large"], "vram": "8GiB"}]
            nodes.append({"name": "cpu-node", "url": fleet.urls["cpu-node"], "vram": 0})
            raw = {
                "nodes": nodes,
                "priority_models": [MODEL],
                "check_interval": 3600,
                "optimizer": {"load_timeout": 600},
            }
            config.write_text(yaml.safe_dump(raw))
            status, took, served = one_run(fleet, config)
        worst = max(worst, took)
        print(f"run {run}: SIGTERM during a {args.load_seconds:g} s load: exit status {status} after {took:.2f} s; "
              f"model still served from its CPU copy: {'yes' if served else 'NO'}")  # fmt: skip
    print(f"goal exit within 5 s: {'met' if worst < 5 else 'MISSED'} (worst {worst:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
