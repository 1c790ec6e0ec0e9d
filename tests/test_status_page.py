"""The optimizer's status page: rendered by headless Chromium, its figures match /api/v1/status.

The screenshot is kept in test-output/status-page.png (CI's artefact folder).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
import requests
from conftest import require_tool

from cli.localstack import REPO
from gpurouter.cluster.config import parse_config
from optimizer.service import OptimizerHandle, start_optimizer
from optimizer.statuspage import render
from simulator.run import Fleet, fleet_from_dict

OUTPUT = REPO / "test-output"


class DataAttributes(HTMLParser):
    """Collects the data-* attributes of every element, by class."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, list[dict[str, str]]] = {}
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        if tag in ("script", "link", "img", "iframe") or attributes.get("src", "").startswith("http"):
            self.external.append(tag)
        data = {k[5:]: v for k, v in attributes.items() if k.startswith("data-")}
        for css in attributes.get("class", "").split():
            if data:
                self.found.setdefault(css, []).append(data)


def parse(html: str) -> DataAttributes:
    parser = DataAttributes()
    parser.feed(html)
    return parser


@pytest.fixture
def optimizer() -> Iterator[OptimizerHandle]:
    fleet = Fleet(
        fleet_from_dict(
            {
                "nodes": [
                    {
                        "name": "gpu-small",
                        "port": 0,
                        "gpus": [{"name": "GTX 1050 Ti", "vram": "4GiB"}],
                        "models": ["mxbai-embed-large", "llama3.2:3b"],
                        "preload": [{"model": "mxbai-embed-large", "keep_alive": -1}],
                    },
                    {
                        "name": "gpu-large",
                        "port": 0,
                        "gpus": [{"name": "RTX 3070", "vram": "8GiB"}],
                        "models": ["llama3.1:latest", "llama3.2:3b"],
                        "preload": [{"model": "llama3.1:latest", "num_gpu": 20, "keep_alive": -1}],
                    },
                    {"name": "cpu-node", "port": 0, "models": ["llama3.2:3b"]},
                ]
            }
        )
    ).start()
    config = parse_config(
        {
            "nodes": [
                {"name": "gpu-small", "url": fleet.urls["gpu-small"], "vram": "4GiB"},
                {"name": "gpu-large", "url": fleet.urls["gpu-large"], "vram": "8GiB"},
                {"name": "cpu-node", "url": fleet.urls["cpu-node"], "vram": 0},
            ],
            "priority_models": ["mxbai-embed-large", "llama3.1:latest"],
            "auto_optimize": False,
        }
    )
    handle = start_optimizer(config, reconcile=False)
    try:
        yield handle
    finally:
        handle.stop()
        fleet.stop()


def test_the_page_is_html_and_self_contained(optimizer: OptimizerHandle) -> None:
    response = requests.get(f"{optimizer.url}/", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    page = parse(response.text)
    assert page.external == []
    assert '<meta http-equiv="refresh"' in response.text
    assert "http://" not in response.text.replace(optimizer.url, "").split("<body>")[0]


def test_chromium_renders_it_and_its_figures_match_the_api(optimizer: OptimizerHandle) -> None:
    chromium = require_tool("chromium")
    OUTPUT.mkdir(exist_ok=True)
    screenshot = OUTPUT / "status-page.png"
    screenshot.unlink(missing_ok=True)
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        f"--user-data-dir={OUTPUT / 'chromium-profile'}",
        "--window-size=1280,1000",
    ]
    dom = subprocess.run([*flags, "--dump-dom", f"{optimizer.url}/"], capture_output=True, text=True, timeout=120)
    subprocess.run([*flags, f"--screenshot={screenshot}", f"{optimizer.url}/"], capture_output=True, timeout=120)
    assert screenshot.exists() and screenshot.stat().st_size > 10_000
    page = parse(dom.stdout)
    status = requests.get(f"{optimizer.url}/api/v1/status", timeout=10).json()

    nodes = {n["name"]: n for n in status["nodes"]}
    shown = {n["node"]: n for n in page.found["node"]}
    assert shown.keys() == nodes.keys()
    for name, node in nodes.items():
        for field, key in (("total", "vram_total_bytes"), ("usable", "vram_usable_bytes"), ("free", "vram_free_bytes")):
            assert shown[name][field] == ("" if node[key] is None else str(node[key])), (name, field)
        assert shown[name]["up"] == str(int(node["up"])) and shown[name]["source"] == node["gpu_source"]

    loaded = {(r["node"], r["model"]): r for r in page.found["loaded"]}
    expected = {(n["name"], m["model"]): m for n in status["nodes"] for m in n["loaded"]}
    assert (
        loaded.keys()
        == expected.keys()
        == {("gpu-small", "mxbai-embed-large:latest"), ("gpu-large", "llama3.1:latest")}
    )
    for key, m in expected.items():
        assert float(loaded[key]["ratio"]) == m["gpu_ratio"] and int(loaded[key]["vram"]) == m["size_vram_bytes"]
    assert 0 < float(loaded[("gpu-large", "llama3.1:latest")]["ratio"]) < 1  # num_gpu 20: partly on CPU

    priority = {p["model"]: p["on-gpu"] for p in page.found["priority"]}
    assert priority == {p["model"]: str(int(p["on_gpu"])) for p in status["priority_models"]}
    assert priority == {"mxbai-embed-large:latest": "1", "llama3.1:latest": "0"}

    fits = {(c["node"], c["model"]): c["fits"] for c in page.found["fit"]}
    for node in status["nodes"]:
        for fit in node["fits"]:
            assert fits[(node["name"], fit["model"])] == str(int(fit["fits"]))


def test_render_escapes_and_handles_an_empty_cluster() -> None:
    html = render({"taken_at": 0, "nodes": [], "priority_models": [{"model": "<b>x", "rank": 1, "on_gpu": False}]}, [])
    assert "<b>x" not in html and "&lt;b&gt;x" in html and "No actions yet." in html


def test_an_action_shows_its_duration() -> None:
    action = {"time": 0, "model": "m:latest", "node": "n", "action": "load", "outcome": "success"}
    html = render({"taken_at": 0, "nodes": [], "priority_models": []}, [{**action, "duration_seconds": 2.5}])
    assert '<td class="num">2.50 s</td>' in html
