"""Hostile configuration and fleet files: alias bombs, deep nesting and huge values are refused at once, in one
line that shows no unbounded value; a key given twice is an error with its line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import run_cli

from gpurouter.cluster.config import ConfigError, load_config
from gpurouter.cluster.yamlfile import MAX_DEPTH, read_yaml

LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9) if prev else ', '.join(['lol'] * 9)}]\n"
    for prev, name in zip([None, *"abcdefgh"], "abcdefghi", strict=True)
)  # "i" expands to 9**9 strings: 387,420,489
assert len(LAUGHS) < 600


@pytest.mark.parametrize(
    "where",
    [
        "nodes: [http://127.0.0.1:1]\nlog_level: *i\n",
        "nodes: [http://127.0.0.1:1]\nmodel_sizes: {x: *i}\n",
        "nodes:\n  - {url: 'http://127.0.0.1:1', vram: *i}\n",
        "nodes:\n  - {url: 'http://127.0.0.1:1', gpu_source: *i}\n",
    ],
    ids=["log_level", "model_sizes", "vram", "gpu_source"],
)
def test_a_billion_laughs_config_is_refused_at_once(tmp_path: Path, where: str) -> None:
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text(LAUGHS + where, encoding="utf-8")
    started = time.monotonic()
    done = run_cli("status", "--config", str(path))
    assert time.monotonic() - started < 10
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gpu-router: {path}: line 6: invalid YAML: aliases expand to more than 100000 values"
    ]


def test_a_billion_laughs_fleet_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(LAUGHS + "nodes: [{name: a, models: *i}]\n", encoding="utf-8")
    started = time.monotonic()
    done = run_cli("simulate", "--fleet", str(path))
    assert time.monotonic() - started < 10
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert "line 6: invalid YAML: aliases expand to more than 100000 values" in done.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: " + "[" * 5000 + "]" * 5000, f"line 1: invalid YAML: nested deeper than {MAX_DEPTH} levels"),
        ("a: " + "{a: " * 40 + "1" + "}" * 40, f"line 1: invalid YAML: nested deeper than {MAX_DEPTH} levels"),
        (
            "".join(f"a{i}: &a{i} [*a{i - 1}]\n" if i else "a0: &a0 [1]\n" for i in range(40)),
            f"invalid YAML: aliases expand to nesting deeper than {MAX_DEPTH} levels",
        ),
        ("a: &a [*a]\n", "line 1: invalid YAML: an alias refers to a value that contains it"),
        ("nodes: [x]\nlog_level: INFO\nnodes: [y]\n", "line 3: invalid YAML: duplicate key 'nodes' (first on line 1)"),
        ("n:\n  - {url: 1,\n     url: 2}\n", "line 3: invalid YAML: duplicate key 'url' (first on line 2)"),
        ("a: '" + "x" * (1024 * 1024) + "'\n", "f.yaml: larger than 1024 KiB: refused"),
    ],
    ids=["deep-lists", "deep-mappings", "alias-chain", "recursive", "duplicate-top", "duplicate-nested", "huge"],
)
def test_the_reader_refuses_what_no_hand_written_file_needs(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "f.yaml"
    path.write_text(text, encoding="utf-8")
    started = time.monotonic()
    with pytest.raises(ValueError) as caught:
        read_yaml(path, "f.yaml")
    assert time.monotonic() - started < 2
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_merge_keys_still_override(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n", encoding="utf-8")
    assert read_yaml(path)["other"] == {"x": 3, "y": 2}


@pytest.mark.parametrize(
    "tail",
    [
        "log_level: '{long}'\n",
        "check_interval: '{long}'\n",
        "nodes: ['http://{long}']\n",
        "model_sizes: {{x: '{long}'}}\n",
        "'{long}': 1\n",
        "model_sizes: {{x: {digits}}}\n",
        "priority_models: [{{name: a, keep_alive: '{long}'}}]\n",
        "check_interval: {digits}\n",
    ],
)
def test_error_messages_show_a_bounded_value(tmp_path: Path, tail: str) -> None:
    text = tail.format(long="x" * 200_000, digits="9" * 4000)
    if not text.startswith("nodes"):
        text = "nodes: [http://127.0.0.1:1]\n" + text
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text(text, encoding="utf-8")
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert time.monotonic() - started < 2
    assert len(str(caught.value)) < 300, str(caught.value)[:300]


def test_a_fleet_file_error_shows_a_bounded_value(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(f"nodes: [{{name: a, models: ['{'x' * 200_000}']}}]\n", encoding="utf-8")
    done = run_cli("simulate", "--fleet", str(path))
    assert done.returncode == 2 and len(done.stderr) < 600, done.stderr[:600]
