"""A cheap fake fleet for the scrape benchmark: many nodes, one process, the simulator's own answers.

`canned(spec)` starts one simulated node (`simulator.run.Fleet`) of the given spec and records, byte for byte,
what it answers to every read a poll makes (`/api/version`, `/api/ps`, `/api/tags` and `/api/show` of each
installed model). `python bench/fakefleet.py ANSWERS.json --nodes N --latency-ms L` then serves those answers
from N ports of one asyncio process (a minimal HTTP/1.1 server: keep-alive, no chunking), each answer after
L ms (as the simulator's `latency_ms` delays every answer), and prints `ready {"node-0000": "http://...", ...}`
on one line once every port listens. It runs until stdin closes or it gets SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulator.run import Fleet, fleet_from_dict

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


def responses(answers: dict[str, Any]) -> dict[str, bytes]:
    """Each canned answer as the bytes of a whole HTTP/1.1 response (keep-alive)."""
    out = {}
    for key, (status, content_type, body) in answers.items():
        data = body.encode()
        head = f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: {content_type}\r\n"
        out[key] = (head + f"Content-Length: {len(data)}\r\n\r\n").encode() + data
    missing = b"404 page not found"
    out["missing"] = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 18\r\n\r\n" + missing
    return out


class NodeProtocol(asyncio.Protocol):
    """One connection to a fake node: reads requests (GET, or POST with a JSON body), answers each after the
    latency, in order."""

    def __init__(self, canned: dict[str, bytes], latency: float) -> None:
        self.canned = canned
        self.latency = latency
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, rest = self.buffer.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            method, path = head.split(b" ", 2)[:2]
            key = path.decode()
            if method == b"POST" and key == "/api/show":
                name = str(json.loads(rest[:length]).get("model", ""))
                key = "show:" + (name if ":" in name else name + ":latest")
            answer = self.canned.get(key, self.canned["missing"])
            asyncio.get_running_loop().call_later(self.latency, self._write, answer)

    def _write(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)


async def serve(answers: dict[str, Any], nodes: int, latency: float) -> None:
    loop = asyncio.get_running_loop()
    canned = responses(answers)
    servers = []
    urls = {}
    for i in range(nodes):
        server = await loop.create_server(lambda: NodeProtocol(canned, latency), "127.0.0.1", 0, backlog=1024)
        servers.append(server)
        urls[f"node-{i:04d}"] = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    print("ready " + json.dumps(urls), flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.buffer.read1(1) else None)
    await stop.wait()
    for server in servers:
        server.close()


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
