"""Hardware classes from the profiles real machines report (built with ops/hw.py's own types), and variant choice."""

from __future__ import annotations

import json

import pytest

from slmops.fleet.hardware import check_class, hardware_class, pick_variant
from slmops.ops.hw import CPU, GPU, Hardware, detect, parse_cpuinfo, parse_nvidia_smi
from slmops.types.errors import InvalidInput

GIB = 1 << 30
XEON = CPU("Intel(R) Xeon(R) Platinum 8480+", "x86_64", 56, 112, ("avx2", "avx512f", "fma"))
PI5 = CPU("ARM CPU part 0xd0b", "aarch64", 4, 4, ("dotprod", "fp16", "neon"))
MAC = CPU("Apple M2", "arm64", 8, 8, ("neon",))
WIN = CPU("AMD Ryzen 7", "AMD64", 8, 16, ("avx2",))
L4 = GPU(0, "NVIDIA L4", "nvidia", 23034 << 20, 22500 << 20, "550.54.15", "8.9")
ORIN = GPU(0, "Orin", "nvidia", 0, 0, "540.3.0", "8.7")  # a Jetson: unified memory, no name prefix
RADEON = GPU(0, "AMD Radeon PRO W7900", "amd", 48 * GIB, 47 * GIB, None, None)


def profile(cpu: CPU, gpus=(), offload=False, providers=()) -> dict:
    """What a device sends: ``Hardware.to_json()`` through JSON, as it crosses the wire."""
    hw = Hardware(cpu=cpu, ram_total_bytes=64 * GIB, ram_available_bytes=32 * GIB, gpus=tuple(gpus),
                  onnx_providers=tuple(providers), llama_gpu_offload=offload)
    return json.loads(json.dumps(hw.to_json()))


@pytest.mark.parametrize(("hw", "expected"), [
    (profile(XEON), "cpu-x86_64"),
    (profile(XEON, [L4], offload=True), "cuda-x86_64"),
    (profile(XEON, [L4], offload=False), "cpu-x86_64"),  # a GPU this llama.cpp build cannot use
    (profile(PI5, [ORIN], offload=True), "cuda-aarch64"),
    (profile(XEON, [RADEON], offload=True), "gpu-x86_64"),
    (profile(XEON, [RADEON, L4], offload=True), "cuda-x86_64"),
    (profile(PI5, providers=("QNNExecutionProvider", "CPUExecutionProvider")), "npu-aarch64"),
    (profile(XEON, providers=("OpenVINOExecutionProvider", "CPUExecutionProvider")), "npu-x86_64"),
    (profile(XEON, [L4], offload=False, providers=("VitisAIExecutionProvider",)), "npu-x86_64"),
    (profile(XEON, [L4], offload=True, providers=("QNNExecutionProvider",)), "cuda-x86_64"),
    (profile(XEON, providers=("CPUExecutionProvider", "CUDAExecutionProvider")), "cpu-x86_64"),
    (profile(PI5), "cpu-aarch64"),
    (profile(MAC), "cpu-aarch64"),
    (profile(WIN), "cpu-x86_64"),
    (profile(CPU("ARMv7 Processor rev 4 (v7l)", "armv7l", 4, 4, ("neon",))), "cpu-armv7"),
])
def test_classes_of_realistic_profiles(hw, expected):
    assert hardware_class(hw, {}) == expected


def test_class_from_the_text_machines_print():
    cpuinfo = "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU part\t: 0xd0b\n"
    smi = "0, NVIDIA L4, 23034, 22500, 550.54.15, 8.9\n"
    hw = detect(read_cpuinfo=lambda: cpuinfo, run_nvidia_smi=lambda: smi, machine="aarch64",
                onnx_providers=lambda: (), llama_offload=lambda: True, query_nvml=lambda: None)
    assert hw.gpus == parse_nvidia_smi(smi) and parse_cpuinfo(cpuinfo, "aarch64")[1] == hw.cpu.features
    assert hardware_class(hw.to_json(), {}) == "cuda-aarch64"


def test_this_machine_has_a_class():
    cls = hardware_class(detect().to_json(), {})
    check_class(cls)
    assert cls.partition("-")[0] in ("cpu", "cuda", "gpu", "npu")


def test_profile_as_slmops_hw_json_prints_it():
    """``slmops hw --json`` nests the profile under ``hardware`` beside the placement."""
    assert hardware_class({"hardware": profile(PI5, [ORIN], offload=True), "placement": {}}, {}) == "cuda-aarch64"


@pytest.mark.parametrize("hw", [{}, {"cpu": None}, {"cpu": {"architecture": 7}}, {"gpus": "many", "cpu": "x"},
                                {"cpu": {"architecture": "weird arch!"}}, {"gpus": [None], "llama_gpu_offload": 1}])
def test_odd_profiles_from_the_wire_give_a_class_not_an_error(hw):
    assert hardware_class(hw, {}) == "cpu-unknown"


def test_class_tag_overrides_the_profile():
    hw = profile(XEON, [L4], offload=True)
    assert hardware_class(hw, {"class": "jetson-orin-nano", "site": "lyon"}) == "jetson-orin-nano"
    assert hardware_class(hw, {"site": "lyon"}) == "cuda-x86_64"


@pytest.mark.parametrize("bad", ["", "CUDA-X86", "-cpu", "has space", "x" * 65, 3])
def test_class_tag_is_validated(bad):
    with pytest.raises(InvalidInput, match="tag class:.*not a hardware class") as err:
        hardware_class(profile(XEON), {"class": bad})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("cls", "keys", "expected"), [
    ("cuda-x86_64", ["cuda-x86_64", "cuda", "*"], "cuda-x86_64"),
    ("cuda-x86_64", ["cuda-aarch64", "cuda", "cpu", "*"], "cuda"),
    ("cuda-x86_64", ["cpu", "*"], "*"),
    ("cuda-x86_64", ["cpu", "cpu-x86_64"], None),
    ("cpu-aarch64", ["cpu-x86_64", "cpu"], "cpu"),
    ("cpu-aarch64", [], None),
    ("npu-aarch64", ["*", "npu-aarch64"], "npu-aarch64"),
    ("jetson-orin-nano", ["jetson", "cuda-aarch64"], "jetson"),
    ("jetson-orin-nano", ["jetson-orin", "*"], "*"),  # the accelerator is the part before the first dash
])
def test_pick_order(cls, keys, expected):
    assert pick_variant(cls, keys) == expected
