"""`gpu_source: ollama_log`: Ollama's server log (real line shapes, several starts, CPU only, multi-GPU,
garbage), its file and command readers, the configuration keys, and a simulated fleet writing the log end to
end through `CapacityReader` and `Observer`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_cli

from cli.localstack import wait_for
from gpurouter.cluster.capacity import CapacityReader
from gpurouter.cluster.config import ConfigError, parse_config
from gpurouter.cluster.observe import Observer
from gpurouter.cluster.ollamalog import (
    LogFile,
    command_capacity,
    file_capacity,
    log_capacity,
    parse_go_size,
    parse_server_log,
)
from gpurouter.cluster.state import Capacity
from gpurouter.units import GIB, MIB
from simulator.fleet import GpuSpec, NodeSpec
from simulator.run import Fleet, fleet_from_dict
from simulator.scheduler import GpuUsage
from simulator.serverlog import start_lines

T = "time=2026-08-20T10:00:00.123+02:00 level=INFO"
CONFIG_LINE = (
    T + ' source=routes.go:1951 msg="server config" env="map[CUDA_VISIBLE_DEVICES: OLLAMA_CONTEXT_LENGTH:{ctx}]"'
)
LISTENING = T + ' source=routes.go:2008 msg="Listening on 127.0.0.1:11434 (version {version})"'
GPU_LINE = (
    T + ' source=types.go:32 msg="inference compute" id=GPU-{n} filter_id="" library=CUDA compute=8.6 name=CUDA{n} '
    'description="{name}" libdirs=ollama,cuda_v12 driver=12.8 pci_id=0000:0{pci}:00.0 type=discrete '
    'total="{total}" available="{free}"'
)
CPU_LINE = (
    T + ' source=types.go:50 msg="inference compute" id=cpu library=cpu compute="" name=cpu description=cpu '
    'libdirs=ollama driver="" pci_id="" type="" total="15.8 GiB" available="6.1 GiB"'
)
TIER_LINE = T + ' source=routes.go:2058 msg="vram-based default context" total_vram="{total}" default_num_ctx={ctx}'
LONG = 20.0  # seconds a command or poll may take when it is meant to succeed (the machine may be busy)
GIN = '[GIN] 2026/08/20 - 10:00:05 | 200 |      50.263µs |       127.0.0.1 | GET      "/api/ps"'


def gpu(n: int, name: str, total: str, free: str, pci: int | None = None) -> str:
    return GPU_LINE.format(n=n, name=name, total=total, free=free, pci=n + 1 if pci is None else pci)


def start(*devices: str, ctx: int = 0, version: str = "0.32.15", tier: tuple[str, int] | None = None) -> list[str]:
    lines = [CONFIG_LINE.format(ctx=ctx), LISTENING.format(version=version), *devices]
    if tier is not None:
        lines.append(TIER_LINE.format(total=tier[0], ctx=tier[1]))
    return [*lines, GIN]


def capacity_of(lines: list[str], where: str = "/var/log/ollama.log") -> Capacity:
    return log_capacity(parse_server_log("\n".join(lines) + "\n"), where)


# ------------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8.0 GiB", 8 * GIB),
        ("512.0 MiB", 512 * MIB),
        ("23.6 GiB", int(23.6 * GIB)),
        ("1.2 TiB", int(1.2 * 1024 * GIB)),
        ("0 B", 0),
        ("12.0 KiB", 12 * 1024),
    ],
)
def test_go_sizes(text: str, expected: int) -> None:
    assert parse_go_size(text) == expected


@pytest.mark.parametrize("text", ["", "8", "8.0", "eight GiB", "-1.0 GiB", "8.0 GB"])
def test_bad_go_sizes(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected a size like 8\.0 GiB"):
        parse_go_size(text)


def test_one_gpu_with_its_default_context() -> None:
    capacity = capacity_of(
        start(gpu(0, "NVIDIA GeForce RTX 3070", "8.0 GiB", "7.4 GiB"), tier=("8.0 GiB", 4096)),
    )
    assert capacity.source == "ollama_log"
    assert [(g.index, g.name, g.total, g.used) for g in capacity.gpus] == [
        (0, "NVIDIA GeForce RTX 3070", 8 * GIB, None)
    ]
    assert capacity.default_context == 4096
    assert "/var/log/ollama.log" in capacity.reason and "version 0.32.15" in capacity.reason
    assert "2026-08-20T10:00:00.123+02:00" in capacity.reason


def test_multi_gpu_numbered_in_pci_order() -> None:
    # Ollama lists devices most free memory first; the PCI order is the one NVML numbers them in
    lines = start(
        gpu(1, "NVIDIA GeForce RTX 3090", "23.6 GiB", "23.1 GiB", pci=2),
        gpu(0, "NVIDIA GeForce RTX 3070", "8.0 GiB", "1.3 GiB", pci=1),
        tier=("31.6 GiB", 32768),
    )
    capacity = capacity_of(lines)
    assert [(g.index, g.name, g.total) for g in capacity.gpus] == [
        (0, "NVIDIA GeForce RTX 3070", 8 * GIB),
        (1, "NVIDIA GeForce RTX 3090", int(23.6 * GIB)),
    ]
    assert capacity.total == 8 * GIB + int(23.6 * GIB)
    assert capacity.default_context == 32768


def test_cpu_only_server_is_a_node_without_gpu() -> None:
    capacity = capacity_of(start(CPU_LINE, tier=("0 B", 4096)))
    assert capacity.source == "none"
    assert capacity.known and capacity.total == 0 and capacity.gpus == ()
    assert capacity.reason.startswith("no GPU: Ollama's log")
    assert capacity.default_context == 4096


def test_the_newest_start_wins() -> None:
    first = start(gpu(0, "RTX 3070", "8.0 GiB", "7.4 GiB"), tier=("8.0 GiB", 4096))
    second = start(CPU_LINE, tier=("0 B", 4096))  # the driver was gone after a restart
    third = start(gpu(0, "RTX 3090", "24.0 GiB", "23.5 GiB"), tier=("24.0 GiB", 32768))
    log = parse_server_log("\n".join(first + second + third))
    assert log.starts == 3
    capacity = log_capacity(log, "x")
    assert [g.name for g in capacity.gpus] == ["RTX 3090"] and capacity.default_context == 32768
    assert capacity_of(first + third + second).source == "none"


def test_a_newest_start_without_devices_yet_is_unknown() -> None:
    lines = [
        *start(gpu(0, "RTX 3070", "8.0 GiB", "7.4 GiB")),
        CONFIG_LINE.format(ctx=0),
        LISTENING.format(version="0.32.15"),
    ]
    capacity = capacity_of(lines)
    assert not capacity.known
    assert 'the start at 2026-08-20T10:00:00.123+02:00 logged no "inference compute" line' in capacity.reason


def test_configured_context_length_wins_over_the_tier_line() -> None:
    # Ollama logs the tier even when OLLAMA_CONTEXT_LENGTH is set; the setting is what it uses
    lines = start(gpu(0, "RTX 3090", "24.0 GiB", "23.5 GiB"), ctx=8192, tier=("24.0 GiB", 32768))
    assert capacity_of(lines).default_context == 8192


def test_cut_and_filtered_logs_still_split_the_starts() -> None:
    one = gpu(0, "RTX 3070", "8.0 GiB", "7.4 GiB")
    two = gpu(0, "RTX 3090", "24.0 GiB", "23.5 GiB")
    # `journalctl -n N` cut the first start's markers off: its devices open the text
    cut = [one, TIER_LINE.format(total="8.0 GiB", ctx=4096), GIN, *start(two)]
    assert [g.name for g in capacity_of(cut).gpus] == ["RTX 3090"]
    # only the device and tier lines kept (e.g. journalctl --grep): the tier line ends a start
    grepped = [one, TIER_LINE.format(total="8.0 GiB", ctx=4096), two, TIER_LINE.format(total="24.0 GiB", ctx=32768)]
    assert parse_server_log("\n".join(grepped)).starts == 2
    assert [g.name for g in capacity_of(grepped).gpus] == ["RTX 3090"]
    # a Listening line after devices, without its server config line, opens a new start
    relisted = [LISTENING.format(version="0.32.14"), one, LISTENING.format(version="0.32.15"), two]
    assert capacity_of(relisted).reason.endswith("version 0.32.15")


def test_journald_prefix_and_older_shapes() -> None:
    prefix = "Aug 20 10:00:00 gpu-box ollama[3422]: "
    lines = [
        # before v0.7.0: the server config line is written before slog is set up
        '2024/08/24 22:31:35 routes.go:1125: INFO server config env="map[OLLAMA_CONTEXT_LENGTH:2048 OLLAMA_DEBUG:false]"',
        'time=2024-08-24T22:31:36.076Z level=INFO source=routes.go:1172 msg="Listening on [::]:11434 (version 0.3.6)"',
        'time=2024-08-24T22:31:37.1Z level=INFO source=types.go:105 msg="inference compute" id=GPU-452c library=cuda '
        'compute=6.1 driver=12.7 name="NVIDIA GeForce GT 1030" total="3.9 GiB" available="3.9 GiB"',
    ]
    capacity = capacity_of([prefix + line for line in lines])
    assert [(g.name, g.total) for g in capacity.gpus] == [("NVIDIA GeForce GT 1030", int(3.9 * GIB))]
    assert capacity.default_context == 2048  # before v0.15.5 no tier line: OLLAMA_CONTEXT_LENGTH is the default
    assert capacity.reason.endswith("version 0.3.6")
    rocm = (
        'time=2025-07-01T19:36:13.315Z level=INFO source=types.go:130 msg="inference compute" id=GPU-9abb57 '
        'library=rocm variant="" compute=gfx1030 driver=6.3 name=1002:73bf total="16.0 GiB" available="1.3 GiB"'
    )
    assert [(g.name, g.total) for g in capacity_of([rocm]).gpus] == [("1002:73bf", 16 * GIB)]


def test_lines_that_only_look_like_device_lines_are_not_devices() -> None:
    lines = [
        # a DEBUG line with the same fields, and the desktop app's own "Matched" line
        'time=2026-08-16T00:44:19.227+12:00 level=DEBUG source=runner.go:235 msg="dropping duplicate device" id=1 '
        'library=Vulkan name=Vulkan2 description="Quadro P6000" total="22.7 GiB" available="22.6 GiB"',
        'time=2026-08-16T00:44:20.000+12:00 level=INFO source=server.go:385 msg=Matched "inference compute"="{CUDA}"',
    ]
    assert not capacity_of(lines).known
    assert capacity_of([*lines, gpu(0, "RTX 3070", "8.0 GiB", "7.4 GiB")]).total == 8 * GIB


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", 'no "inference compute" line (is this Ollama\'s server log'),
        ("hello\nworld\n\x00\xff garbage = \"unterminated\n", 'no "inference compute" line'),
        ("\n".join([GIN] * 50), "does it reach back to its last start?"),
        (gpu(0, "RTX 3070", "lots", "7.4 GiB"), "the start at 2026-08-20T10:00:00.123+02:00: an \"inference compute\" "
         "line has total='lots'"),
        (T + ' msg="inference compute" id=GPU-1 library=CUDA name=CUDA0', "has total=''"),
    ],
)  # fmt: skip
def test_unreadable_logs_are_unknown_with_the_reason(text: str, reason: str) -> None:
    capacity = log_capacity(parse_server_log(text), "/var/log/ollama.log")
    assert capacity.source == "unknown"
    assert capacity.reason.startswith("ollama_log: /var/log/ollama.log: ")
    assert reason in capacity.reason
    assert "\n" not in capacity.reason


def test_one_bad_device_line_spoils_only_its_own_start() -> None:
    bad = start(gpu(0, "RTX 3070", "8.0 GiB", "7.4 GiB"), gpu(1, "RTX 3070", "n/a", "7.4 GiB"))
    good = start(gpu(0, "RTX 3090", "24.0 GiB", "23.5 GiB"))
    assert not capacity_of(good + bad).known
    assert capacity_of(bad + good).total == 24 * GIB


# ------------------------------------------------------------------------------------------------ reading


def test_log_file_missing_empty_and_growing(tmp_path: Path) -> None:
    path = tmp_path / "ollama.log"
    log = LogFile(path)
    reader = CapacityReader(parse_config({"nodes": [node("a", file=str(path))]}))
    assert reader.read_node(reader.config.nodes[0]).reason.startswith(
        f"ollama_log: cannot read {path}: No such file or directory"
    )
    path.write_text("")
    assert not file_capacity(log).known and "is empty" in file_capacity(log).reason
    path.write_text("\n".join(start(gpu(0, "RTX 3070", "8.0 GiB", "7.4 GiB"))) + "\n")
    assert file_capacity(log).total == 8 * GIB
    with path.open("a") as handle:  # a restart appended, its last line still being written
        handle.write("\n".join(start(gpu(0, "RTX 3090", "24.0 GiB", "23.5 GiB"))[:3]))
    assert file_capacity(log).total == 24 * GIB
    with path.open("a") as handle:
        handle.write("\n" + TIER_LINE.format(total="24.0 GiB", ctx=32768) + "\n")
    assert file_capacity(log).default_context == 32768
    assert parse_server_log(path.read_text()).starts == log.read().starts == 2


def test_log_file_rotated_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "server.log"
    path.write_text("\n".join(start(gpu(0, "RTX 3070", "8.0 GiB", "7.4 GiB"))) + "\n")
    log = LogFile(path)
    assert log.read().starts == 1
    rotated = tmp_path / "server.log.new"  # the desktop app rotates server.log at every server start
    rotated.write_text("\n".join(start(CPU_LINE)) + "\n")
    os.replace(rotated, path)
    assert log.read().starts == 1 and file_capacity(log).source == "none"
    rewritten = start(gpu(0, "A", "4.0 GiB", "4.0 GiB"), gpu(1, "B", "4.0 GiB", "4.0 GiB"), ctx=2048)
    path.write_text("\n".join(rewritten) + "\n")  # in place (copytruncate), longer: its first line differs
    assert file_capacity(log).total == 8 * GIB
    path.write_text("\n".join(start(gpu(0, "A", "4.0 GiB", "4.0 GiB"))) + "\n")  # in place, shorter
    assert file_capacity(log).total == 4 * GIB


def test_command_output_failures_and_timeout(tmp_path: Path) -> None:
    path = tmp_path / "ollama.log"
    path.write_text("\n".join(start(gpu(0, "RTX 3070", "8.0 GiB", "7.4 GiB"))) + "\n")
    assert command_capacity(("tail", "-n", "200", str(path)), LONG).total == 8 * GIB
    failed = command_capacity(("tail", "-n", "200", str(tmp_path / "absent.log")), LONG)
    assert failed.reason.startswith(f"ollama_log: `tail -n 200 {tmp_path / 'absent.log'}` failed (exit status 1): ")
    assert "No such file or directory" in failed.reason
    missing = command_capacity(("no-such-program-xyz", "-n", "1"), LONG)
    assert missing.reason == "ollama_log: cannot run `no-such-program-xyz -n 1`: No such file or directory"
    slow = command_capacity((sys.executable, "-c", "import time; time.sleep(30)"), 0.3)
    assert not slow.known and slow.reason.endswith("did not finish within 0.3 s")
    to_stderr = f"import sys; sys.stderr.write(open({str(path)!r}).read())"  # like `docker logs` passes it on
    assert command_capacity((sys.executable, "-c", to_stderr), LONG).total == 8 * GIB
    said = command_capacity(
        (sys.executable, "-c", "import sys; print('-- No entries --'); sys.stderr.write('denied')"), LONG
    )
    assert 'no "inference compute" line' in said.reason and said.reason.endswith("(stderr: denied)")


# ------------------------------------------------------------------------------------------ configuration


def node(name: str, url: str = "http://127.0.0.1:1", **log: str) -> dict:
    return {"name": name, "url": url, "gpu_source": "ollama_log", "ollama_log": log}


def test_config_file_and_command_forms() -> None:
    config = parse_config(
        {
            "nodes": [
                node("a", file="~/.ollama/logs/server.log"),
                node(
                    "b", "http://127.0.0.1:2", command="journalctl -u ollama -o cat -n 200 --grep 'inference compute'"
                ),
            ]
        }
    )
    a, b = config.nodes
    assert a.gpu_source == "ollama_log" and a.ollama_log is not None
    assert a.ollama_log.file == os.path.expanduser("~/.ollama/logs/server.log") and a.ollama_log.command == ()
    assert b.ollama_log is not None and b.ollama_log.file is None
    assert b.ollama_log.command == (
        "journalctl",
        "-u",
        "ollama",
        "-o",
        "cat",
        "-n",
        "200",
        "--grep",
        "inference compute",
    )


BAD = [
    ({"url": "http://a:1", "gpu_source": "ollama_log"}, "nodes[0].ollama_log: missing: gpu_source ollama_log reads"),
    ({"url": "http://a:1", "ollama_log": {"file": "/x"}}, "nodes[0].ollama_log: only read with gpu_source: ollama_log"),
    (node("a", file="/x", command="cat /x"), "nodes[0].ollama_log: give exactly one of file or command"),
    ({"url": "http://a:1", "gpu_source": "ollama_log", "ollama_log": {}}, "give exactly one of file or command"),
    (node("a", fil="/x"), "nodes[0].ollama_log.fil: unknown key (did you mean 'file'?)"),
    (node("a", command="tail -n 5 'unclosed"), "nodes[0].ollama_log.command: cannot split \"tail -n 5 'unclosed\""),
    (node("a", command="  "), "nodes[0].ollama_log.command: expected a non-empty string"),
    ({"url": "http://a:1", "gpu_source": "ollama_log", "ollama_log": "/var/log/ollama.log"},
     "nodes[0].ollama_log: expected {file: PATH} or {command: \"journalctl -u ollama …\"}, got '/var/log/ollama.log'"),
    ({"url": "http://a:1", "gpu_source": "ollama_logs"}, "(did you mean 'ollama_log'?)"),
]  # fmt: skip


@pytest.mark.parametrize(("item", "message"), BAD, ids=[m[:50] for _, m in BAD])
def test_bad_ollama_log_settings_name_the_problem(item: dict, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"nodes": [item]}, "gpu_router_config.yaml")
    assert str(caught.value).startswith("gpu_router_config.yaml: ")
    assert message in str(caught.value)


def test_bad_setting_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "gpu_router_config.yaml"
    path.write_text("nodes:\n  - {url: 'http://127.0.0.1:1', gpu_source: ollama_log, ollama_log: {fiel: /x}}\n")
    done = run_cli("status", "--config", str(path))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"gpu-router: {path}: nodes[0].ollama_log.fiel: unknown key (did you mean 'file'?)"
    ]


# ----------------------------------------------------------------------------------- simulator, end to end


def usage(*totals: int) -> list[GpuUsage]:
    return [GpuUsage(i, f"GPU {i}", total, 0, total) for i, total in enumerate(totals)]


@pytest.mark.parametrize(
    ("totals", "overhead", "context", "expected"),
    [
        ((8 * GIB,), 0, 0, 4096),
        ((24 * GIB,), 0, 0, 32768),
        ((23 * GIB,), 0, 0, 32768),
        ((24 * GIB,), 1536 * MIB, 0, 4096),  # OLLAMA_GPU_OVERHEAD counts against the tier: 22.5 GiB
        ((24 * GIB, 24 * GIB), 0, 0, 262144),
        ((), 0, 0, 4096),
        ((24 * GIB,), 0, 8192, 8192),
    ],
)
def test_simulated_start_lines_read_back(totals: tuple[int, ...], overhead: int, context: int, expected: int) -> None:
    spec = NodeSpec(
        name="n", port=0, gpus=tuple(GpuSpec("G", t) for t in totals), gpu_overhead=overhead, context_length=context
    )
    lines = start_lines(spec, (0, 32, 15), usage(*totals), "http://127.0.0.1:11434", 1_787_000_000.0)
    capacity = log_capacity(parse_server_log("\n".join(lines)), "sim")
    assert capacity.total == sum(totals)
    assert capacity.source == ("ollama_log" if totals else "none")
    assert capacity.default_context == expected
    assert sum('msg="vram-based default context"' in line for line in lines) == 1


@pytest.mark.parametrize(("version", "shape"), [((0, 12, 3), "variant=v12"), ((0, 12, 6), "pci_id=0000:01:00.0")])
def test_simulated_older_versions_write_their_own_shapes(version: tuple[int, ...], shape: str) -> None:
    spec = NodeSpec(name="n", port=0, version=".".join(map(str, version)), context_length=4096)
    lines = start_lines(spec, version, usage(12 * GIB), "http://127.0.0.1:11434", 1_787_000_000.0)
    assert shape in lines[2] and not any("vram-based default context" in line for line in lines)
    capacity = log_capacity(parse_server_log("\n".join(lines)), "sim")
    assert capacity.total == 12 * GIB and capacity.default_context == 4096


FLEET = {
    "nodes": [
        {"name": "small", "version": "0.32.15", "gpus": [{"name": "NVIDIA GeForce RTX 3070", "vram": "8GiB"}]},
        {"name": "big", "version": "0.32.15", "context_length": 8192, "gpus": [
            {"name": "NVIDIA GeForce RTX 3090", "vram": "24GiB"}, {"name": "NVIDIA RTX A4000", "vram": "16GiB"}]},
        {"name": "cpu", "version": "0.32.15"},
    ]
}  # fmt: skip


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with Fleet(fleet_from_dict(FLEET), log_dir=tmp_path / "logs") as running:
        yield running


def log_config(fleet: Fleet, logs: Path) -> dict:
    return {
        "nodes": [
            node("small", fleet.urls["small"], file=str(logs / "small.log")),
            node("big", fleet.urls["big"], command=f"tail -n 200 {logs / 'big.log'}"),
            node("cpu", fleet.urls["cpu"], file=str(logs / "cpu.log")),
        ]
    }


def test_a_simulated_fleet_read_through_its_logs(fleet: Fleet, tmp_path: Path) -> None:
    config = parse_config(log_config(fleet, tmp_path / "logs"))
    with Observer(config) as observer:
        state = observer.poll(deadline=LONG)
    by_node = {n.name: n for n in state.nodes}
    for name in ("small", "big"):
        simulated = sorted(g["total"] for g in fleet.node(name).state()["gpus"])
        capacity = by_node[name].capacity
        assert capacity.source == "ollama_log", capacity.reason
        assert sorted(g.total for g in capacity.gpus) == simulated
    assert [g.name for g in by_node["big"].capacity.gpus] == ["NVIDIA GeForce RTX 3090", "NVIDIA RTX A4000"]
    assert by_node["small"].capacity.default_context == 4096
    assert by_node["big"].capacity.default_context == 8192  # OLLAMA_CONTEXT_LENGTH, not the 40 GiB tier
    assert by_node["big"].default_context == (8192, "Ollama's log")  # the context models get there
    assert state.need("llama3.1:8b", "big") is None or state.need("llama3.1:8b", "big").num_ctx == 8192
    assert "`tail -n 200 " in by_node["big"].capacity.reason
    assert by_node["cpu"].capacity.source == "none" and by_node["cpu"].vram_total == 0
    assert by_node["small"].vram_total == 8 * GIB and by_node["small"].up


def test_a_restart_with_changed_gpus_the_newest_start_wins(fleet: Fleet, tmp_path: Path) -> None:
    config = parse_config(log_config(fleet, tmp_path / "logs"))
    reader = CapacityReader(config)
    small, big = config.nodes[0], config.nodes[1]
    assert reader.read_node(small).total == 8 * GIB
    fleet.node("small").inject("gpu_lost")
    assert reader.read_node(small).total == 8 * GIB  # the GPUs vanished, but the server has not restarted
    fleet.node("small").inject("restart")
    lost = reader.read_node(small)
    assert lost.source == "none" and "no GPU" in lost.reason
    fleet.node("small").clear("gpu_lost")
    fleet.node("small").inject("vram_hog", bytes="2GiB")
    fleet.node("small").inject("restart")
    back = reader.read_node(small)
    assert back.source == "ollama_log" and back.total == 8 * GIB
    assert parse_server_log((tmp_path / "logs" / "small.log").read_text()).starts == 3
    assert 'available="6.0 GiB"' in (tmp_path / "logs" / "small.log").read_text().splitlines()[-2]
    fleet.node("big").inject("gpu_lost")
    fleet.node("big").inject("restart")
    assert reader.read_node(big, LONG).source == "none"  # the command form sees the newest start too


def test_gpu_router_simulate_writes_the_logs(tmp_path: Path) -> None:
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("nodes:\n  - {name: solo, version: 0.32.15, gpus: [{name: RTX 4090, vram: 24GiB}]}\n")
    logs = tmp_path / "logs"
    printed = tmp_path / "out.txt"
    with printed.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "simulate", "--fleet", str(fleet_file), "--log-dir", str(logs)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:  # "control URL" is printed once every node has started (and written its log) and SIGTERM is handled
            wait_for(lambda: "control http://127.0.0.1:" in printed.read_text(), 30, "the fleet to start")
            text = (logs / "solo.log").read_text()
        finally:
            process.terminate()
            process.wait(timeout=30)
    capacity = log_capacity(parse_server_log(text), "solo.log")
    assert [(g.name, g.total) for g in capacity.gpus] == [("RTX 4090", 24 * GIB)]
    assert process.returncode == 0
