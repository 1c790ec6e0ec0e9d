"""The simulator in the llama-server era (v0.30+, reference ollama-current.md §2): admission, GPU choice, fit,
measured sizes, VRAM-tier contexts, num_gpu, out-of-memory retries, API differences, the official client."""

from __future__ import annotations

import json

import ollama
import pytest
import requests

from gpurouter.units import GIB, MIB
from simulator import catalog, llamacpp
from simulator.placer import file_bytes
from simulator.run import Fleet, fleet_from_dict

LLAMA = catalog.find("llama3.1:8b")
MXBAI = catalog.find("mxbai-embed-large")
assert LLAMA is not None and MXBAI is not None


def node(name: str, gpus: tuple[str, ...] = ("8GiB",), **extra: object) -> dict:
    return {
        "name": name,
        "version": "0.32.15",
        "gpus": [{"name": f"GPU {i}", "vram": v} for i, v in enumerate(gpus)],
        "models": ["llama3.1:8b", "codellama:7b", "llama3.2:3b", "mxbai-embed-large", "nomic-embed-text"],
        "token_rate": 0,
        **extra,
    }


@pytest.fixture(scope="module")
def fleet():
    spec = fleet_from_dict(
        {
            "nodes": [
                node("g8"),
                node("g24", ("24GiB",)),
                node("g48", ("24GiB", "24GiB")),
                node("env", ("24GiB",), context_length=8192),
                {"name": "cpu", "models": ["llama3.1:8b"], "token_rate": 0},
            ]
        }
    )
    with Fleet(spec) as running:
        yield running


BASELINE: dict[str, dict[str, dict[str, int]]] = {}


@pytest.fixture
def reset(fleet):
    for name in fleet.urls:
        fleet.node(name).clear()
        fleet.node(name).scheduler.unload_all()
        BASELINE[name] = fleet.node(name).counts()
    return fleet


def post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(url + path, data=json.dumps(body), timeout=30)


def load(url: str, model: str, **options: object) -> requests.Response:
    body: dict = {"model": model, "prompt": "", "stream": False}
    if options:
        body["options"] = options
    return post(url, "/api/generate", body)


def ps(url: str) -> dict[str, dict]:
    return {m["name"]: m for m in requests.get(url + "/api/ps", timeout=5).json()["models"]}


def counts(fleet: Fleet, name: str) -> dict[str, dict[str, int]]:
    """Loads and unloads per model since the test began."""
    before = BASELINE.get(name, {})
    now = fleet.node(name).counts()
    return {
        model: {k: v - before.get(model, {}).get(k, 0) for k, v in c.items()}
        for model, c in now.items()
        if c != before.get(model)
    }


# ------------------------------------------------------------------------------ contexts and sizes


def test_default_context_follows_the_vram_tier_unless_the_node_sets_one(reset):
    urls = reset.urls
    for name, expected in (("g8", 4096), ("g24", 32768), ("g48", 131072), ("env", 8192), ("cpu", 4096)):
        assert load(urls[name], "llama3.1:8b").status_code == 200
        assert ps(urls[name])["llama3.1:8b"]["context_length"] == expected, name  # 262144 clamped to 131072


def test_full_offload_reports_the_measured_footprint_as_size_and_size_vram(reset):
    url = reset.urls["g24"]
    load(url, "llama3.1:8b")
    post(url, "/api/embed", {"model": "mxbai-embed-large", "input": []})
    models = ps(url)
    llama, mxbai = models["llama3.1:8b"], models["mxbai-embed-large:latest"]
    assert llama["size"] == llama["size_vram"]
    whole = llamacpp.buffers(LLAMA.arch, 32768, 1, [LLAMA.arch.block_count + 1])
    assert llama["size"] == whole.size_vram  # the sum of llama-server's logged buffers
    weights, kv, compute = 4403.49 * MIB, 4096 * MIB, 140 * MIB  # the calibration (llamacpp's docstring)
    assert abs(llama["size"] - (weights + kv + compute)) < 2 * MIB
    assert mxbai["context_length"] == 512 and mxbai["size"] == mxbai["size_vram"]
    assert mxbai["size"] < MXBAI.tags_size  # no KV cache, no output layer: less than the file
    assert mxbai["size"] == llamacpp.buffers(MXBAI.arch, 512, 1, [MXBAI.arch.block_count + 1]).size_vram


# --------------------------------------------------------------------------------- admission and fit


def test_the_first_model_always_starts_and_fit_keeps_a_gib_free(reset):
    url = reset.urls["g8"]
    reset.node("g8").inject("vram_hog", bytes=int(2.5 * GIB))  # 5.5 GiB free: footprint 4.9 GiB + 1 GiB > it
    assert load(url, "llama3.1:8b").status_code == 200  # admitted: nothing else is loaded
    copy = ps(url)["llama3.1:8b"]
    assert 0 < copy["size_vram"] < copy["size"]  # partly on CPU although "it fits"
    gpu = reset.node("g8").state()["gpus"][0]
    assert gpu["free"] >= GIB  # llama.cpp left its margin


def test_a_second_model_evicts_the_first_when_the_prediction_exceeds_80_percent(reset):
    url = reset.urls["g8"]
    load(url, "llama3.2:3b")  # 2.4 GiB
    assert load(url, "codellama:7b").status_code == 200  # predicts 5.97 GB > 80 % of 5.6 GiB free
    assert set(ps(url)) == {"codellama:7b"}
    assert counts(reset, "g8")["llama3.2:3b"] == {"loads": 1, "unloads": 1}
    post(url, "/api/embed", {"model": "mxbai-embed-large", "input": []})  # small enough to be admitted beside it
    assert set(ps(url)) == {"codellama:7b", "mxbai-embed-large:latest"}


def test_a_multi_gpu_node_prefers_one_gpu_and_main_gpu_pins(reset):
    url = reset.urls["g48"]
    load(url, "llama3.2:3b", num_ctx=4096)
    gpus = reset.node("g48").state()["gpus"]
    assert sorted(g["used"] > 0 for g in gpus) == [False, True]  # on one GPU only
    load(url, "codellama:7b", num_ctx=4096, main_gpu=1)
    used = [g["used"] for g in reset.node("g48").state()["gpus"]]
    assert used[1] > 5 * GIB  # pinned to GPU 1


def test_a_model_too_large_for_one_gpu_is_spread_over_the_group(reset):
    url = reset.urls["g48"]
    load(url, "codellama:7b")  # 131072 → 16384 tokens: 11.9 GiB... fits one 24 GiB GPU
    load(url, "llama3.1:8b", num_ctx=131072)  # predicts 24 GB: more than 80 % of either GPU
    used = [g["used"] for g in reset.node("g48").state()["gpus"]]
    assert all(u > 0 for u in used)


# ----------------------------------------------------------------------------------------- num_gpu


def test_num_gpu_zero_loads_on_cpu(reset):
    url = reset.urls["g8"]
    load(url, "llama3.1:8b", num_gpu=0)
    assert ps(url)["llama3.1:8b"]["size_vram"] == 0


def test_an_exact_layer_count_skips_admission_and_never_evicts(reset):
    url = reset.urls["g8"]
    load(url, "codellama:7b")
    assert load(url, "llama3.1:8b", num_gpu=4).status_code == 200
    models = ps(url)
    assert set(models) == {"codellama:7b", "llama3.1:8b"}  # nothing evicted
    assert 0 < models["llama3.1:8b"]["size_vram"] < models["llama3.1:8b"]["size"]


def test_all_layers_forced_without_room_fail_with_out_of_memory(reset):
    url = reset.urls["g8"]
    reply = load(url, "llama3.1:8b", num_ctx=32768, num_gpu=33)  # 8.4 GiB on an 8 GiB card, nothing else loaded
    assert reply.status_code == 500
    assert reply.json()["error"].startswith("llama-server process has terminated: exit status 1: ")
    assert "cudaMalloc failed: out of memory" in reply.json()["error"]
    assert ps(url) == {}


def test_out_of_memory_with_others_loaded_evicts_them_all_and_retries_once(reset):
    url = reset.urls["g8"]
    post(url, "/api/embed", {"model": "mxbai-embed-large", "input": []})
    reset.node("g8").inject("vram_hog", bytes=3 * GIB)  # 4.4 GiB free, 5 GiB once mxbai is gone
    assert load(url, "llama3.1:8b", num_gpu=33, num_ctx=4096).status_code == 200  # explicit context: no shrink
    assert set(ps(url)) == {"llama3.1:8b"}
    assert counts(reset, "g8")["mxbai-embed-large:latest"] == {"loads": 1, "unloads": 1}  # Ollama evicted it
    load(url, "llama3.1:8b", num_gpu=0)
    post(url, "/api/embed", {"model": "mxbai-embed-large", "input": []})
    reset.node("g8").inject("vram_hog", bytes=4 * GIB)
    assert load(url, "llama3.1:8b", num_gpu=33, num_ctx=4096).status_code == 500  # one retry, then the error
    assert ps(url) == {}  # the old runner went first (a reload), the others were evicted for the retry


def test_out_of_memory_with_an_automatic_context_retries_at_the_next_tier(reset):
    url = reset.urls["g24"]
    reset.node("g24").inject("vram_hog", bytes=16 * GIB)  # 8 GiB free: 32768 tokens do not fit, 4096 do
    assert load(url, "llama3.1:8b", num_gpu=33).status_code == 200
    copy = ps(url)["llama3.1:8b"]
    assert copy["context_length"] == 4096 and copy["size"] == copy["size_vram"]
    # a later request without num_ctx matches the runner: two automatic contexts are equal
    load(url, "llama3.1:8b")
    assert counts(reset, "g24")["llama3.1:8b"] == {"loads": 1, "unloads": 0}


def test_a_request_without_num_gpu_never_moves_a_cpu_runner(reset):
    url = reset.urls["g8"]
    load(url, "llama3.1:8b", num_gpu=0)
    load(url, "llama3.1:8b")
    assert ps(url)["llama3.1:8b"]["size_vram"] == 0
    assert load(url, "llama3.1:8b", num_gpu=33).status_code == 200  # a set num_gpu reloads it
    copy = ps(url)["llama3.1:8b"]
    assert copy["size"] == copy["size_vram"]
    assert counts(reset, "g8")["llama3.1:8b"] == {"loads": 2, "unloads": 1}


def test_the_loaded_models_cap_is_three_per_gpu(reset):
    url = reset.urls["g24"]
    for model in ("mxbai-embed-large", "nomic-embed-text"):
        post(url, "/api/embed", {"model": model, "input": []})
    load(url, "llama3.2:3b", num_ctx=2048)
    load(url, "codellama:7b", num_ctx=2048)
    assert len(ps(url)) == 3


# ---------------------------------------------------------------------------------------------- API


def test_tags_carry_capabilities_and_the_trained_context(reset):
    tags = {m["name"]: m for m in requests.get(reset.urls["g8"] + "/api/tags", timeout=5).json()["models"]}
    llama, mxbai = tags["llama3.1:8b"], tags["mxbai-embed-large:latest"]
    assert llama["capabilities"] == ["completion", "tools"] and mxbai["capabilities"] == ["embedding"]
    assert (llama["details"]["context_length"], llama["details"]["embedding_length"]) == (131072, 4096)
    assert mxbai["details"]["context_length"] == 512


def test_show_hides_array_values_without_verbose(reset):
    url = reset.urls["g8"]
    plain = post(url, "/api/show", {"model": "llama3.1:8b"}).json()["model_info"]
    assert plain["tokenizer.ggml.tokens"] is None and plain["llama.block_count"] == 32
    verbose = post(url, "/api/show", {"model": "llama3.1:8b", "verbose": True}).json()["model_info"]
    assert len(verbose["tokenizer.ggml.tokens"]) == 128256
    missing = post(url, "/api/show", {"model": "nope"})
    assert (missing.status_code, missing.json()) == (404, {"error": "model 'nope:latest' not found"})


def test_unload_semantics(reset):
    url = reset.urls["g8"]
    reply = post(url, "/api/generate", {"model": "llama3.1:8b", "prompt": "", "keep_alive": 0})
    assert reply.json()["done_reason"] == "unload" and ps(url) == {}
    assert "llama3.1:8b" not in counts(reset, "g8")  # unloading never loads first
    post(url, "/api/embed", {"model": "mxbai-embed-large", "input": [], "keep_alive": 0})
    assert counts(reset, "g8")["mxbai-embed-large:latest"] == {"loads": 1, "unloads": 1}  # loads, then unloads
    embed_on_generate = post(url, "/api/generate", {"model": "mxbai-embed-large", "prompt": ""})
    assert embed_on_generate.status_code == 400
    assert embed_on_generate.json() == {"error": '"mxbai-embed-large" does not support generate'}


def test_the_official_ollama_client_lists_shows_loads_embeds_and_unloads(reset):
    client = ollama.Client(host=reset.urls["g24"])
    names = {m.model for m in client.list().models}
    assert {"llama3.1:8b", "mxbai-embed-large:latest"} <= names
    shown = client.show("llama3.1:8b")
    assert shown.modelinfo["llama.context_length"] == 131072 and "completion" in shown.capabilities
    assert client.generate(model="llama3.1:8b", prompt="").done_reason == "load"
    assert client.embed(model="mxbai-embed-large", input="hello").embeddings[0]
    running = {m.model: m for m in client.ps().models}
    assert running["llama3.1:8b"].context_length == 32768
    assert running["llama3.1:8b"].size == running["llama3.1:8b"].size_vram
    assert client.generate(model="llama3.1:8b", prompt="", keep_alive=0).done_reason == "unload"
    assert "llama3.1:8b" not in {m.model for m in client.ps().models}


def test_the_prediction_uses_the_blob_not_the_manifest(reset):
    assert 0 < LLAMA.tags_size - file_bytes(LLAMA) < 10_000  # the manifest's other layers: a few KB
