"""Hostile configuration and fleet files: alias bombs, deep nesting and huge values are refused at once, in one
line that shows no unbounded value; a key given twice is an error with its line; a control character or an
integer of any length in any base is one line naming the file (and the key), and so is every mutation of the
example files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpurouter.cluster.config import ConfigError, load_config
from gpurouter.cluster.yamlfile import MAX_DEPTH, read_yaml
from simulator.fleet import load_fleet

EXAMPLES = Path(__file__).parent.parent / "examples"

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


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("nodes: [http://127.0.0.1:1]\n# a comment with \x01 in it\n", 2),
        ("nodes: [http://127.0.0.1:1]\nlog_level: 'IN\x7fFO'\n", 2),
        ("\x00nodes: [http://127.0.0.1:1]\n", 1),
        ("nodes: [http://127.0.0.1:1]\n\n\n\x1b[31m: 1\n", 4),
    ],
    ids=["comment", "string", "nul", "escape"],
)
def test_a_control_character_anywhere_is_one_line_with_the_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text(text, encoding="utf-8")
    done = run_cli("status", "--config", str(path))
    assert done.returncode == 2
    [message] = done.stderr.strip().splitlines()
    assert message.startswith(f"gpu-router: {path}: line {line}: invalid YAML: control character U+"), message


HUGE = {
    "hex": "0x" + "f" * 5000,
    "binary": "0b" + "1" * 20_000,
    "octal": "0" + "7" * 6000,
    "base 60": "1" + ":59" * 3000,
    "decimal": "9" * 5000,
    "negative": "-" + "9" * 5000,
}


@pytest.mark.parametrize("number", HUGE.values(), ids=HUGE.keys())
@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("check_interval: {}\n", "check_interval"),
        ("vram_safety_margin: {}\n", "vram_safety_margin"),
        ("model_sizes: {{x: {}}}\n", "model_sizes.x"),
        ("priority_models: [{{name: a, keep_alive: {}}}]\n", "priority_models[0].keep_alive"),
        ("proxy: {{max_body: {}}}\n", "proxy.max_body"),
    ],
    ids=["check_interval", "margin", "size", "keep_alive", "max_body"],
)
def test_an_integer_of_any_length_names_the_file_and_key(tmp_path: Path, where: str, key: str, number: str) -> None:
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text("nodes: [http://127.0.0.1:1]\n" + where.format(number), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: expected ") and "digits" in message and len(message) < 300, message


@pytest.mark.parametrize("number", [HUGE["hex"], HUGE["decimal"], "9" * 400, "-" + "9" * 400])
def test_a_huge_fleet_keep_alive_is_one_line_naming_the_file_and_key(tmp_path: Path, number: str) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(f"nodes:\n  - {{name: a, keep_alive: {number}}}\n", encoding="utf-8")
    done = run_cli("simulate", "--fleet", str(path))
    assert done.returncode == 2
    [message] = done.stderr.strip().splitlines()
    assert message.startswith(f"gpu-router simulate: {path}: nodes[0].keep_alive: expected a duration"), message


def test_a_fleet_that_cannot_start_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "nodes:\n  - {name: a, gpus: [{vram: 1GiB}], ram: 1GiB, models: [llama3.1:8b], preload: [{model: llama3.1:8b}]}\n",
        encoding="utf-8",
    )
    done = run_cli("simulate", "--fleet", str(path))
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]  # after the simulated node's own log line about the failed load
    assert last.startswith(f"gpu-router simulate: {path}: node a: preload llama3.1:8b: model requires"), last


# What the adversarial run inserted into the example files: control characters, long integers in every base,
# lone surrogates, YAML's own punctuation.
_INSERTS = [
    *HUGE.values(),
    "\x01", "\x00", "\x7f", "\x85", "\t", "\ufeff", '"\\ud800"', '"\\x01"', "\\ud800",
    "*a", "&a", "!!binary", "!!python/object:os.system", "<<: 1", "{", "}", "[", "]", ": ", "- ", "'", '"', "#",
    "1e999", ".nan", "-.inf", "~", "0o17", "12:30:45", "2001-12-14", "yes", "9" * 30,
]  # fmt: skip


def _mutations() -> st.SearchStrategy[list[tuple[float, str]]]:
    return st.lists(st.tuples(st.floats(0, 1), st.sampled_from(_INSERTS) | st.text(max_size=3)), min_size=1, max_size=3)


def _mutate(text: str, edits: list[tuple[float, str]]) -> str:
    for where, insert in edits:
        at = int(where * len(text))
        text = text[:at] + insert + text[at:]
    return text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=_mutations())
def test_every_mutation_of_the_example_config_loads_or_is_one_line(tmp_path: Path, edits: list) -> None:
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text(_mutate((EXAMPLES / "gpu_router_config.yaml").read_text(), edits), encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < len(str(path)) + 500, message
        message.encode("utf-8")  # printable on any terminal
    else:
        for name in [n.name for n in config.nodes] + [p.name for p in config.priority_models]:
            assert name.isprintable(), name


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=_mutations())
def test_every_mutation_of_the_demo_fleet_loads_or_is_one_line(tmp_path: Path, edits: list) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(_mutate((EXAMPLES / "demo-fleet.yaml").read_text(), edits), encoding="utf-8")
    try:
        fleet = load_fleet(path)
    except ValueError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < len(str(path)) + 500, message
        message.encode("utf-8")
    else:
        for node in fleet.nodes:
            assert all(g.name.isprintable() for g in node.gpus) and all(m.isprintable() for m in node.models)


def test_a_missing_fleet_file_is_one_line_with_the_command_and_the_file(tmp_path: Path) -> None:
    done = run_cli("simulate", "--fleet", str(tmp_path / "nosuch.yaml"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"gpu-router simulate: {tmp_path / 'nosuch.yaml'}: no such file"]


@pytest.mark.parametrize("text", ["nodes: *a" + "f" * 2000 + "\n", "nodes: !!binary" + "0x" + "f" * 2000 + " x\n"])
def test_a_huge_alias_or_tag_is_clipped_in_the_one_line(tmp_path: Path, text: str) -> None:
    """PyYAML quotes an undefined alias or an unknown tag whole: the message clips it (found by the fuzzer)."""
    path = tmp_path / "fleet.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        load_fleet(path)
    message = str(caught.value)
    assert (
        message.startswith(f"{path}: line 1: invalid YAML: ")
        and message.endswith("…")
        and len(message) < len(str(path)) + 300
    )
