"""The configuration file: the guide's file loads unchanged; every bad file gets a one-line, exact error."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import run_cli

from gpurouter.cluster.config import ConfigError, load_config, model_key, parse_config
from gpurouter.units import GIB, MIB, parse_size

GUIDE_CONFIG = """\
# List of Ollama nodes to manage
nodes:
  - http://localhost:11434
  - http://10.9.66.124:11434
  - http://10.9.66.154:11434

# Priority models to keep on GPU
# These will be automatically moved to GPU if detected on CPU
priority_models:
  - mxbai-embed-large    # Embedding model (705 MB)
  - nomic-embed-text     # Alternative embedding (274 MB)
  # - llama3.2:3b        # Small chat model (1.9GB)

check_interval: 300
vram_safety_margin: 0.8
auto_optimize: true
log_level: INFO
"""


def write(tmp_path: Path, text: str, name: str = "gpu_router_config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_the_guides_file_loads_unchanged(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GUIDE_CONFIG))
    assert [n.name for n in config.nodes] == ["localhost:11434", "10.9.66.124:11434", "10.9.66.154:11434"]
    assert all(n.gpu_source == "auto" and n.vram is None for n in config.nodes)
    assert [p.name for p in config.priority_models] == ["mxbai-embed-large", "nomic-embed-text"]
    assert config.priority_models[0].keep_alive == -1
    assert (config.check_interval, config.vram_safety_margin, config.auto_optimize) == (300, 0.8, True)
    assert config.priority_rank("mxbai-embed-large:latest") == 1
    assert config.priority_rank("llama3.2:3b") is None


def test_the_example_config_loads() -> None:
    config = load_config(Path(__file__).parent.parent / "examples" / "gpu_router_config.yaml")
    assert [n.name for n in config.nodes] == ["gpu-small", "cpu-node", "gpu-large"]
    assert config.node("cpu-node").static_gpus == ()
    assert config.node("gpu-large").static_gpus[0].vram == 8 * GIB


def test_full_form_with_every_option(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
            nodes:
              - name: gpu-small
                url: http://127.0.0.1:11501/
                vram: 4GiB
                gpu_source: static
                maintenance: true
                context_length: 8192
              - name: multi
                url: http://127.0.0.1:11502
                gpus: [{name: A, vram: 24GiB}, {vram: 12288}]
              - name: remote
                url: https://127.0.0.1:11503
                gpu_source: prometheus
                prometheus_match: 'Hostname="remote"'
            priority_models:
              - name: llama3.1:latest
                num_ctx: 8192
                keep_alive: 10m
              - mxbai-embed-large
            model_sizes: {my-custom-model: 2500, other: 2.5GiB}
            request_timeout: 1.5
            prometheus_url: http://127.0.0.1:9090
            prometheus: {template: nvidia_gpu_exporter, max_age: 60}
            optimizer:
              cooldown_seconds: 5
              cooldown_max_seconds: 60
              max_loads_per_node: 2
              load_timeout: 120
              webhook_auth: {bearer_token_env: GPU_ROUTER_TOKEN}
            log_level: debug
            """,
        )
    )
    small, multi, remote = config.nodes
    assert small.url == "http://127.0.0.1:11501" and small.vram == 4 * GIB and small.maintenance
    assert small.context_length == 8192
    assert [g.vram for g in multi.gpus] == [24 * GIB, 12 * GIB] and multi.gpus[1].name == "GPU 1"
    assert remote.prometheus_match == 'Hostname="remote"'
    assert config.priority_models[0].num_ctx == 8192 and config.priority_models[0].keep_alive == "10m"
    assert config.model_sizes == {"my-custom-model:latest": 2500 * MIB, "other:latest": int(2.5 * GIB)}
    assert config.prometheus.url == "http://127.0.0.1:9090" and config.prometheus.template == "nvidia_gpu_exporter"
    assert config.optimizer.max_loads_per_node == 2 and config.optimizer.webhook_auth.enabled
    assert config.log_level == "DEBUG"


def test_config_is_immutable(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GUIDE_CONFIG))
    with pytest.raises(AttributeError):
        config.nodes = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.model_sizes["x"] = 1  # type: ignore[index]


BAD_FILES = [
    ("", "gpu_router_config.yaml: the file is empty"),
    ("nodes: [http://a:1\n", "gpu_router_config.yaml: line 2: invalid YAML"),
    ("- http://a:1\n", "gpu_router_config.yaml: expected a mapping, got a list"),
    ("priority_models: [x]\n", "gpu_router_config.yaml: nodes: missing"),
    ("nodes: []\n", "gpu_router_config.yaml: nodes: expected a non-empty list"),
    ("nodes: http://a:1\n", "gpu_router_config.yaml: nodes: expected a non-empty list"),
    ("nodes: [ftp://a:1]\n", "gpu_router_config.yaml: nodes[0]: expected an http(s) URL"),
    ("nodes: ['http://a:99999']\n", "gpu_router_config.yaml: nodes[0]: expected an http(s) URL"),
    (
        "nodes:\n  - http://a:1\n  - {url: http://b:1, vram: eight}\n",
        "gpu_router_config.yaml: nodes[1].vram: expected a size like 8GiB, got 'eight'",
    ),
    ("nodes:\n  - {url: http://b:1, vrma: 8GiB}\n", "nodes[0].vrma: unknown key (did you mean 'vram'?)"),
    ("nodes: [http://a:1]\nchek_interval: 5\n", "chek_interval: unknown key (did you mean 'check_interval'?)"),
    ("nodes:\n  - {name: x, url: http://a:1}\n  - {name: x, url: http://b:1}\n", "nodes[1].name: duplicate name 'x'"),
    ("nodes: [http://a:1, 'http://a:1/']\n", "nodes[1].name: duplicate name 'a:1'"),
    (
        "nodes:\n  - {name: x, url: http://a:1}\n  - {name: y, url: http://a:1}\n",
        "nodes[1].url: duplicate url 'http://a:1'",
    ),
    ("nodes: ['HTTP://A:1', 'http://a:1']\n", "nodes[1].name: duplicate name 'a:1' (also nodes[0])"),
    ("nodes: ['http://127.0.0.1:11434', 'http://localhost:11434/']\n", "nodes[1].url: duplicate url"),
    ("nodes: ['http://[gpu-small.lan:11434']\n", "nodes[0]: expected an http(s) URL like http://host:11434"),
    ("nodes: ['http://[::1]:11434', 'http://localhost:11434']\n", "nodes[1].url: duplicate url"),
    ("nodes: [{name: x, url: 'http://a'}, {name: y, url: 'http://a:80'}]\n", "nodes[1].url: duplicate url"),
    ("nodes: [{name: x, url: 'https://a:443'}, {name: y, url: 'https://u:p@a'}]\n", "nodes[1].url: duplicate url"),
    (
        "nodes:\n  - {name: x, url: http://a:1}\n  - {name: y, url: 'http://A:1'}\n",
        "nodes[1].url: duplicate url 'http://A:1' (also nodes[0])",
    ),
    ("nodes: [http://a:1]\nlog_level: INFO\nlog_level: DEBUG\n", "line 3: invalid YAML: duplicate key 'log_level'"),
    ("nodes: [http://a:1]\nmodel_sizes: {x: .inf}\n", "model_sizes.x: expected a size like 8GiB, got inf"),
    ("nodes: [http://a:1]\nmodel_sizes: {x: 1.0e+300}\n", "model_sizes.x: expected a size up to 1 PiB, got 1e+300"),
    ("nodes:\n  - {url: http://a:1, vram: .nan}\n", "nodes[0].vram: expected a size like 8GiB, got nan"),
    ("nodes:\n  - {url: http://a:1, gpus: [{vram: 1.0e+300}]}\n", "nodes[0].gpus[0].vram: expected a size up to 1 PiB"),
    ("nodes:\n  - {url: http://a:1, context_length: .inf}\n", "nodes[0].context_length: expected a finite number"),
    ("nodes:\n  - {url: http://a:1, num_parallel: 1.0e+300}\n", "nodes[0].num_parallel: expected a number ≤ 256"),
    ("nodes: [http://a:1]\npriority_models: [{name: a, num_ctx: 1.0e+300}]\n", "num_ctx: expected a number ≤ 16777216"),
    ("nodes: [http://a:1]\npriority_models: [{name: a, num_ctx: 0}]\n", "num_ctx: expected a number ≥ 1, got 0"),
    ("nodes: [http://a:1]\ncheck_interval: .nan\n", "check_interval: expected a finite number, got nan"),
    ("nodes: [http://a:1]\ncheck_interval: 1.0e+300\n", "check_interval: expected a number ≤ 86400, got 1e+300"),
    ("nodes: [http://a:1]\nrequest_timeout: .nan\n", "request_timeout: expected a finite number, got nan"),
    ("nodes: [http://a:1]\nrequest_timeout: .inf\n", "request_timeout: expected a finite number, got inf"),
    ("nodes: [http://a:1]\nrequest_timeout: 1.0e+300\n", "request_timeout: expected a number ≤ 3600, got 1e+300"),
    ("nodes: [http://a:1]\noptimizer: {load_timeout: .nan}\n", "optimizer.load_timeout: expected a finite number"),
    ("nodes: [http://a:1]\noptimizer: {cooldown_seconds: .nan}\n", "optimizer.cooldown_seconds: expected a finite"),
    ("nodes: [http://a:1]\noptimizer: {max_loads_per_node: .inf}\n", "optimizer.max_loads_per_node: expected a finite"),
    ("nodes: [http://a:1]\noptimizer: {max_loads_per_node: 1.0e+300}\n", "max_loads_per_node: expected a number ≤ 64"),
    ("nodes: [http://a:1]\nprometheus: {max_age: .nan}\n", "prometheus.max_age: expected a finite number"),
    ("nodes: [http://a:1]\nvram_safety_margin: .nan\n", "vram_safety_margin: expected a finite number, got nan"),
    (
        "nodes: [http://a:1]\npriority_models: [{name: a, keep_alive: forever}]\n",
        "priority_models[0].keep_alive: expected seconds (-1 = forever) or a duration like 5m or 1h30m, got 'forever'",
    ),
    ("nodes: [http://a:1]\npriority_models: [{name: a, keep_alive: '-1'}]\n", "keep_alive: expected seconds"),
    ("nodes: [http://a:1]\npriority_models: [{name: a, keep_alive: .inf}]\n", "keep_alive: expected seconds"),
    ("nodes: [http://a:1]\npriority_models: [{name: a, keep_alive: 1.0e+300}]\n", "keep_alive: expected seconds"),
    ("nodes: [http://a:1]\nvram_safety_margin: 0\n", "vram_safety_margin: expected a fraction in (0, 1], got 0"),
    ("nodes: [http://a:1]\nvram_safety_margin: 1.5\n", "vram_safety_margin: expected a fraction in (0, 1]"),
    ("nodes: [http://a:1]\ncheck_interval: -5\n", "check_interval: expected a number ≥ 0, got -5"),
    ("nodes: [http://a:1]\ncheck_interval: soon\n", "check_interval: expected a number, got 'soon'"),
    ("nodes: [http://a:1]\nauto_optimize: yes please\n", "auto_optimize: expected true or false"),
    ("nodes: [http://a:1]\nlog_level: LOUD\n", "log_level: expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ("nodes: [http://a:1]\npriority_models: mxbai\n", "priority_models: expected a list"),
    ("nodes: [http://a:1]\npriority_models: [{num_ctx: 5}]\n", "priority_models[0].name: missing"),
    ("nodes: [http://a:1]\npriority_models: [a, 'a:latest']\n", "priority_models[1]: duplicate model 'a:latest'"),
    ("nodes: [http://a:1]\nmodel_sizes: {x: -3}\n", "model_sizes.x: expected a size like 8GiB, got -3"),
    ("nodes:\n  - {url: http://a:1, gpu_source: nvidai}\n", "nodes[0].gpu_source: expected one of auto, nvml"),
    ("nodes:\n  - {url: http://a:1, gpu_source: static}\n", "nodes[0].gpu_source: static needs vram or gpus"),
    ("nodes:\n  - {url: http://a:1, gpu_source: prometheus}\n", "prometheus_url: required when a node has"),
    ("nodes:\n  - {url: http://a:1, vram: 4GiB, gpus: [{vram: 4GiB}]}\n", "nodes[0]: give either vram or gpus"),
    ("nodes:\n  - {url: http://a:1, gpus: [{name: x}]}\n", "nodes[0].gpus[0].vram: missing"),
    ("nodes:\n  - {name: x}\n", "nodes[0].url: missing"),
    ("nodes: [http://a:1]\nrequest_timeout: 0\n", "request_timeout: expected a number > 0, got 0"),
    (
        "nodes: [http://a:1]\noptimizer: {webhook_auth: {username: u}}\n",
        "optimizer.webhook_auth: basic auth needs both username and password",
    ),
    (
        "nodes: [http://a:1]\noptimizer: {webhook_auth: {bearer_token: a, bearer_token_file: /x}}\n",
        "optimizer.webhook_auth.bearer_token: give only one of bearer_token, bearer_token_file",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES, ids=[m[:40] for _, m in BAD_FILES])
def test_bad_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert message in str(caught.value)
    assert str(caught.value).startswith("gpu_router_config.yaml") or str(caught.value).startswith(str(path))
    assert "\n" not in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "nodes:\n  - http://a:1\n  - {url: http://b:1, vram: eight}\n")
    done = run_cli("status", "--config", str(path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gpu-router: {path}: nodes[1].vram: expected a size like 8GiB, got 'eight'"  # the file's full path
    ]


@pytest.mark.parametrize("keep_alive", [-1, 0, 300, 0.5, "5m", "1h30m", "-1m", "0", "300ms"])
def test_keep_alive_takes_what_ollama_takes(keep_alive: object) -> None:
    config = parse_config(
        {"nodes": ["http://127.0.0.1:1"], "priority_models": [{"name": "a", "keep_alive": keep_alive}]}
    )
    assert config.priority_models[0].keep_alive == keep_alive


def test_infinite_numbers_exit_2_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "nodes: [http://a:1]\ncheck_interval: .nan\n")
    done = run_cli("optimizer", "--config", str(path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gpu-router: {path}: check_interval: expected a finite number, got nan"
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4GiB", 4 * GIB),
        ("4096MiB", 4 * GIB),
        ("4.5GB", int(4.5 * GIB)),
        ("705 MB", 705 * MIB),
        ("1PiB", 1024**5),
        (705, 705 * MIB),
    ],
)
def test_sizes(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value", ["eight", "4 parsecs", -1, True, None, "", [4], float("inf"), float("nan"), "9" * 400]
)
def test_bad_sizes(value: object) -> None:
    with pytest.raises(ValueError, match="expected a size like 8GiB"):
        parse_size(value)


def test_model_key() -> None:
    assert model_key("mxbai-embed-large") == "mxbai-embed-large:latest"
    assert model_key("llama3.1:8b") == "llama3.1:8b"
    assert model_key("registry.local:5000/team/model") == "registry.local:5000/team/model:latest"


def test_parse_config_accepts_dicts() -> None:
    config = parse_config({"nodes": ["http://127.0.0.1:1"]}, "inline")
    assert config.source == "inline" and config.priority_models == ()
