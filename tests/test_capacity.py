"""GPU capacity sources: static, none, nvml (a fake pynvml), amd (a fake sysfs tree), auto, plugged readers."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli.localstack import wait_for
from gpurouter.cluster.capacity import CapacityReader, amd_capacity, is_local, nvml_capacity, static_capacity
from gpurouter.cluster.config import Config, NodeConfig, parse_config
from gpurouter.cluster.state import Capacity, GpuInfo
from gpurouter.units import GIB, MIB


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_FunctionNotFound(NVMLError):
    pass


class FakeNvml:
    """The slice of pynvml the reader uses, over a list of (name, total, free, reserved) devices."""

    NVMLError = NVMLError
    nvmlMemory_v2 = 0x2000028

    def __init__(
        self,
        devices: Sequence[tuple[str | bytes, int, int, int]] = (),
        *,
        init_error: Exception | None = None,
        v2: bool = True,
        fail_on: str | None = None,
    ) -> None:
        self.devices = list(devices)
        self.init_error = init_error
        self.v2 = v2
        self.fail_on = fail_on
        self.inits = 0
        self.shutdowns = 0
        self.memory_calls: list[object] = []

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if self.fail_on == "handle":
            raise NVMLError("GPU is lost")
        return index

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return self.devices[handle][0]

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> SimpleNamespace:
        self.memory_calls.append(version)
        _, total, free, reserved = self.devices[handle]
        if version is None:
            return SimpleNamespace(total=total, free=free, used=total - free)
        if not self.v2:
            raise NVMLError_FunctionNotFound("Function Not Found")
        return SimpleNamespace(version=version, total=total, reserved=reserved, free=free, used=total - free - reserved)


def config(*nodes: dict) -> Config:
    return parse_config({"nodes": list(nodes)})


def write_card(root: Path, card: str, total: int | str | None, used: int | str | None, name: str | None = None) -> None:
    device = root / "class" / "drm" / card / "device"
    device.mkdir(parents=True)
    if total is not None:
        (device / "mem_info_vram_total").write_text(f"{total}\n")
    if used is not None:
        (device / "mem_info_vram_used").write_text(f"{used}\n")
    if name is not None:
        (device / "product_name").write_text(f"{name}\n")


# ------------------------------------------------------------------------------------------ static / none


def test_static_from_vram_and_gpus() -> None:
    cfg = config(
        {"name": "one", "url": "http://10.0.0.1:11434", "vram": "8GiB"},
        {"name": "two", "url": "http://10.0.0.2:11434", "gpus": [{"name": "A", "vram": "4GiB"}, {"vram": 6144}]},
        {"name": "cpu", "url": "http://10.0.0.3:11434", "vram": 0},
        {"name": "free", "url": "http://10.0.0.4:11434"},
    )
    one, two, cpu, free = (static_capacity(n) for n in cfg.nodes)
    assert one == Capacity("static", (GpuInfo(0, "GPU", 8 * GIB),), "from the configuration")
    assert two is not None and [(g.index, g.name, g.total) for g in two.gpus] == [
        (0, "A", 4 * GIB),
        (1, "GPU 1", 6 * GIB),
    ]
    assert cpu is not None and cpu.source == "none" and cpu.total == 0
    assert free is None


def test_reader_static_none_and_remote_auto_unknown() -> None:
    cfg = config(
        {"name": "gpu", "url": "http://10.0.0.1:11434", "vram": "8GiB", "gpu_source": "static"},
        {"name": "cpu", "url": "http://10.0.0.2:11434", "gpu_source": "none"},
        {"name": "remote", "url": "http://10.0.0.3:11434"},
    )
    nvml = FakeNvml([("RTX", 8 * GIB, 8 * GIB, 0)])
    caps = CapacityReader(cfg, nvml=nvml, sysfs_root="/nonexistent").read(cfg.nodes, 1.0)
    assert caps["gpu"].source == "static" and caps["gpu"].total == 8 * GIB
    assert caps["cpu"].source == "none" and caps["cpu"].known and caps["cpu"].total == 0
    assert not caps["remote"].known and "set vram (or gpus)" in caps["remote"].reason
    assert nvml.inits == 0  # nobody asked for a local probe


def test_is_local() -> None:
    assert is_local("http://127.0.0.1:11434") and is_local("http://localhost:1") and is_local("http://[::1]:1")
    assert not is_local("http://10.9.66.124:11434")


# ------------------------------------------------------------------------------------------------- nvml


def test_nvml_reads_every_device_with_v2_memory_info() -> None:
    nvml = FakeNvml([(b"NVIDIA GeForce RTX 3070", 8 * GIB, 6 * GIB, 300 * MIB), ("GTX 1050 Ti", 4 * GIB, 4 * GIB, 0)])
    cap = nvml_capacity(nvml)
    assert cap.source == "nvml" and cap.known
    assert cap.gpus == (
        GpuInfo(0, "NVIDIA GeForce RTX 3070", 8 * GIB, 2 * GIB),  # used = total − free (reserve included)
        GpuInfo(1, "GTX 1050 Ti", 4 * GIB, 0),
    )
    assert cap.total == 12 * GIB and cap.device_used == 2 * GIB
    assert nvml.memory_calls == [FakeNvml.nvmlMemory_v2] * 2
    assert nvml.inits == nvml.shutdowns == 1


def test_nvml_falls_back_to_v1_memory_info() -> None:
    nvml = FakeNvml([("Old", 4 * GIB, 3 * GIB, 0)], v2=False)
    cap = nvml_capacity(nvml)
    assert cap.gpus == (GpuInfo(0, "Old", 4 * GIB, GIB),)
    assert nvml.memory_calls == [FakeNvml.nvmlMemory_v2, None]


def test_nvml_without_driver_is_unknown_not_a_crash() -> None:
    nvml = FakeNvml(init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    cap = nvml_capacity(nvml)
    assert not cap.known and cap.reason == "NVML: NVML Shared Library Not Found"
    assert nvml.shutdowns == 0


def test_nvml_error_mid_read_is_unknown_and_shuts_down() -> None:
    nvml = FakeNvml([("A", GIB, GIB, 0)], fail_on="handle")
    cap = nvml_capacity(nvml)
    assert not cap.known and "GPU is lost" in cap.reason
    assert nvml.shutdowns == 1


def test_nvml_without_devices_is_unknown() -> None:
    assert nvml_capacity(FakeNvml([])).reason == "NVML: no NVIDIA GPU found"


def test_explicit_nvml_source_failing_is_unknown_with_reason() -> None:
    cfg = config({"name": "box", "url": "http://10.0.0.9:11434", "gpu_source": "nvml"})
    nvml = FakeNvml(init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    cap = CapacityReader(cfg, nvml=nvml).read_node(cfg.nodes[0])
    assert not cap.known
    assert "NVML Shared Library Not Found" in cap.reason and "box" in cap.reason


def test_real_pynvml_on_this_machine_never_raises() -> None:
    pynvml = pytest.importorskip("pynvml")
    cap = nvml_capacity(pynvml)
    assert cap.source in ("nvml", "unknown")
    assert cap.known or cap.reason.startswith("NVML: ")


# -------------------------------------------------------------------------------------------------- amd


def test_amd_reads_cards_in_numeric_order(tmp_path: Path) -> None:
    write_card(tmp_path, "card10", 16 * GIB, 0, name="Radeon Pro")
    write_card(tmp_path, "card1", 8 * GIB, 512 * MIB)
    write_card(tmp_path, "card0", None, None)  # an Intel iGPU: no mem_info files
    (tmp_path / "class" / "drm" / "card1-DP-1").mkdir()  # a connector, not a card
    cap = amd_capacity(tmp_path)
    assert cap.source == "amd"
    assert cap.gpus == (
        GpuInfo(0, "AMD GPU (card1)", 8 * GIB, 512 * MIB),
        GpuInfo(1, "Radeon Pro", 16 * GIB, 0),
    )


def test_amd_without_used_file_reports_total_only(tmp_path: Path) -> None:
    write_card(tmp_path, "card0", 4 * GIB, None)
    cap = amd_capacity(tmp_path)
    assert cap.gpus == (GpuInfo(0, "AMD GPU (card0)", 4 * GIB, None),) and cap.device_used is None


def test_amd_without_cards_or_with_garbage_is_unknown(tmp_path: Path) -> None:
    assert not amd_capacity(tmp_path).known
    assert "no GPU with mem_info_vram_total" in amd_capacity(tmp_path).reason
    write_card(tmp_path, "card0", "lots", 0)
    cap = amd_capacity(tmp_path)
    assert not cap.known and "cannot read" in cap.reason


# ------------------------------------------------------------------------------------------------- auto


def local_auto(tmp_path: Path, **node: object) -> tuple[Config, NodeConfig]:
    cfg = config({"name": "here", "url": "http://127.0.0.1:11434", **node})
    return cfg, cfg.nodes[0]


def test_auto_prefers_static_over_probes(tmp_path: Path) -> None:
    cfg, node = local_auto(tmp_path, vram="4GiB")
    nvml = FakeNvml([("RTX", 8 * GIB, 8 * GIB, 0)])
    assert CapacityReader(cfg, nvml=nvml).read_node(node).total == 4 * GIB
    assert nvml.inits == 0


def test_auto_on_a_local_node_reads_nvml(tmp_path: Path) -> None:
    cfg, node = local_auto(tmp_path)
    cap = CapacityReader(cfg, nvml=FakeNvml([("RTX", 8 * GIB, 7 * GIB, 0)]), sysfs_root=tmp_path).read_node(node)
    assert cap.source == "nvml" and cap.total == 8 * GIB and cap.device_used == GIB


def test_auto_falls_through_nvml_to_amd(tmp_path: Path) -> None:
    cfg, node = local_auto(tmp_path)
    write_card(tmp_path, "card0", 16 * GIB, GIB)
    nvml = FakeNvml(init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    cap = CapacityReader(cfg, nvml=nvml, sysfs_root=tmp_path).read_node(node)
    assert cap.source == "amd" and cap.total == 16 * GIB


def test_auto_on_a_local_node_without_gpu_is_unknown_with_both_reasons(tmp_path: Path) -> None:
    cfg, node = local_auto(tmp_path)
    nvml = FakeNvml(init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    cap = CapacityReader(cfg, nvml=nvml, sysfs_root=tmp_path).read_node(node)
    assert not cap.known
    assert "NVML Shared Library Not Found" in cap.reason and "AMD: no GPU" in cap.reason
    assert "vram: 0 for a CPU node" in cap.reason


def test_auto_local_probe_is_read_once_for_several_local_nodes(tmp_path: Path) -> None:
    cfg = config({"name": "a", "url": "http://127.0.0.1:11434"}, {"name": "b", "url": "http://localhost:11435"})
    nvml = FakeNvml([("RTX", 8 * GIB, 8 * GIB, 0)])
    caps = CapacityReader(cfg, nvml=nvml).read(cfg.nodes, 1.0)
    assert caps["a"] == caps["b"] and caps["a"].source == "nvml"
    assert nvml.inits == 1


def test_a_hung_driver_leaves_the_capacity_unknown_and_holds_one_thread() -> None:
    """NVML that never answers: each read answers within its timeout (unknown, with the reason), and the
    probe still running is waited for, not started again."""
    release = threading.Event()

    class HungNvml(FakeNvml):
        def nvmlInit(self) -> None:
            super().nvmlInit()
            release.wait(30)

    cfg = config({"name": "a", "url": "http://127.0.0.1:11434", "gpu_source": "nvml"})
    nvml = HungNvml([("RTX", 8 * GIB, 8 * GIB, 0)])
    reader = CapacityReader(cfg, nvml=nvml)
    try:
        for _ in range(3):
            began = time.monotonic()
            cap = reader.read(cfg.nodes, 0.4)["a"]
            assert time.monotonic() - began < 0.4 + 0.3  # its timeout, and room for a busy machine
            assert not cap.known and cap.reason.startswith("NVML: no answer within 0.4 s")
        assert nvml.inits == 1
    finally:
        release.set()
    wait_for(lambda: reader.read(cfg.nodes, 2.0)["a"].source == "nvml", 10, "the released probe's answer")


def test_auto_uses_the_injected_locality(tmp_path: Path) -> None:
    cfg = config({"name": "lan", "url": "http://10.0.0.5:11434"})
    nvml = FakeNvml([("RTX", 8 * GIB, 8 * GIB, 0)])
    cap = CapacityReader(cfg, nvml=nvml, local=lambda url: True).read_node(cfg.nodes[0])
    assert cap.source == "nvml"


# ------------------------------------------------------------------------------------------ plugged readers


def test_a_plugged_prometheus_reader_is_asked_once_for_its_nodes() -> None:
    cfg = parse_config(
        {
            "prometheus_url": "http://127.0.0.1:9",
            "nodes": [
                {"name": "p1", "url": "http://10.0.0.1:11434", "gpu_source": "prometheus"},
                {"name": "p2", "url": "http://10.0.0.2:11434", "gpu_source": "prometheus"},
                {"name": "s", "url": "http://10.0.0.3:11434", "vram": "4GiB"},
            ],
        }
    )
    calls: list[tuple[list[str], float]] = []

    def reader(nodes: Sequence[NodeConfig], timeout: float) -> dict[str, Capacity]:
        calls.append(([n.name for n in nodes], timeout))
        return {"p1": Capacity("prometheus", (GpuInfo(0, "A100", 80 * GIB, GIB),), "query")}

    caps = CapacityReader(cfg, sources={"prometheus": reader}).read(cfg.nodes, 1.5)
    assert calls == [(["p1", "p2"], 1.5)]
    assert caps["p1"].source == "prometheus" and caps["p1"].total == 80 * GIB
    assert not caps["p2"].known and "no answer for p2" in caps["p2"].reason
    assert caps["s"].source == "static"


def test_a_failing_reader_makes_its_nodes_unknown_only() -> None:
    cfg = config(
        {"name": "n", "url": "http://10.0.0.1:11434", "gpu_source": "amd"},
        {"name": "s", "url": "http://x:1", "vram": 1024},
    )

    def broken(nodes: Sequence[NodeConfig], timeout: float) -> dict[str, Capacity]:
        raise RuntimeError("boom")

    caps = CapacityReader(cfg, sources={"amd": broken}).read(cfg.nodes, 1.0)
    assert not caps["n"].known and "RuntimeError: boom" in caps["n"].reason
    assert caps["s"].total == 1024 * MIB
