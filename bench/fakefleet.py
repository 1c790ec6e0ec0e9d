"""A cheap fake fleet for the scrape benchmark: many nodes, one process, the simulator's own answers.

`canned(spec)` starts one simulated node (`simulator.run.Fleet`) of the given spec and records, byte for byte,
what it answers to every read a poll makes (`/api/version`, `/api/ps`, `/api/tags` and `/api/show` of each
installed model). `python bench/fakefleet.py ANSWERS.json --nodes N --latency-ms L` then serves those answers
from N ports of one aiohttp process, each after L ms (as the simulator's `latency_ms` delays every answer),
and prints `ready {"node-0000": "http://127.0.0.1:PORT", ...}` on one line once every port listens. It runs
until stdin closes or it gets SIGTERM. Every node answers exactly what the simulated node answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulator.run import Fleet, fleet_from_dict  # noqa: E402

READS = ("/api/version", "/api/ps", "/api/tags")


def canned(node_spec: dict[str, Any]) -> dict[str, Any]:
    """What one simulated node of `node_spec` answers: {path or "show:<model>": [status, content type, body]}."""
    import requests

    with Fleet(fleet_from_dict({"nodes": [{**node_spec, "name": "canned", "port": 0, "latency_ms": 0}]})) as fleet:
        url = fleet.urls["canned"]
        answers: dict[str, Any] = {}
        for path in READS:
            got = requests.get(url + path, timeout=10)
            answers[path] = [got.status_code, got.headers.get("Content-Type", ""), got.text]
        for model in got.json()["models"]:  # the last read: /api/tags
            shown = requests.post(url + "/api/show", json={"model": model["name"]}, timeout=10)
            answers["show:" + model["name"]] = [shown.status_code, shown.headers.get("Content-Type", ""), shown.text]
    return answers


def application(answers: dict[str, Any], latency: float) -> web.Application:
    def reply(key: str) -> web.Response:
        status, content_type, body = answers.get(key, [404, "text/plain", "404 page not found"])
        return web.Response(status=status, body=body.encode(), headers={"Content-Type": content_type})

    async def read(request: web.Request) -> web.Response:
        await asyncio.sleep(latency)
        return reply(request.path)

    async def show(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(latency)
        name = str(body.get("model", ""))
        return reply("show:" + (name if ":" in name else name + ":latest"))

    app = web.Application()
    for path in READS:
        app.router.add_get(path, read)
    app.router.add_post("/api/show", show)
    return app


async def serve(answers: dict[str, Any], nodes: int, latency: float) -> None:
    runner = web.AppRunner(application(answers, latency), access_log=None)
    await runner.setup()
    urls = {}
    for i in range(nodes):
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        urls[f"node-{i:04d}"] = f"http://127.0.0.1:{port}"
    print("ready " + json.dumps(urls), flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.buffer.read1(1) else None)
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("answers", type=Path, help="canned answers (JSON, from canned())")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--latency-ms", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(json.loads(args.answers.read_text()), args.nodes, args.latency_ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
