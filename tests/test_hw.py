"""Hardware detection on this machine and, from the text such machines print, on GPU and ARM ones; the placement
and variant offer chosen from each."""

import json

import pytest
from pathlib import Path

from conftest import run_cli

from slmops.ops.hw import (
    CPU,
    GPU,
    Hardware,
    detect,
    offer,
    parse_cpuinfo,
    parse_nvidia_smi,
)
from slmops.ops.placement import ALL_LAYERS, place

X86_AVX512 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 avx512f avx512bw avx512_vnni amx_int8 avx_vnni
"""
ARM_PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b
"""
SMI = """0, NVIDIA L4, 23034, 22500, 550.54.15, 8.9
1, NVIDIA A100-SXM4-40GB, 40960, 1024, 550.54.15, [N/A]
"""
GIB = 1 << 30


def box(gpus=(), offload=False, available=16 * GIB, providers=()):
    return Hardware(cpu=CPU("x", "x86_64", 8, 16, ("avx2",)), ram_total_bytes=32 * GIB,
                    ram_available_bytes=available, gpus=tuple(gpus), onnx_providers=tuple(providers),
                    llama_gpu_offload=offload)


def test_this_machine(cli_home):
    r = run_cli("hw", "--json", home=cli_home)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    cpu = data["hardware"]["cpu"]
    assert cpu["physical_cores"] >= 1 and cpu["logical_cores"] >= cpu["physical_cores"]
    assert data["hardware"]["ram_total_bytes"] > data["hardware"]["ram_available_bytes"] > 0
    assert all(f == f.lower() for f in cpu["features"])
    flags = Path("/proc/cpuinfo").read_text()
    if " avx2" in flags:
        assert "avx2" in cpu["features"]
    assert data["placement"]["num_thread"] == cpu["physical_cores"] and data["placement"]["reasons"]
    table = run_cli("hw", home=cli_home).stdout
    assert f"{cpu['physical_cores']} physical, {cpu['logical_cores']} logical" in table
    assert "placement: " in table


def test_x86_and_arm_cpuinfo_are_read_into_one_vocabulary():
    model, feats = parse_cpuinfo(X86_AVX512, "x86_64")
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fma", "f16c"} <= set(feats)
    model, feats = parse_cpuinfo(ARM_PI5, "aarch64")
    assert model == "ARM CPU part 0xd0b" and {"neon", "dotprod", "fp16"} <= set(feats) and "avx2" not in feats


def test_nvidia_smi_output_and_its_absence():
    l4, a100 = parse_nvidia_smi(SMI)
    assert (l4.name, l4.memory_total_bytes, l4.compute_capability) == ("NVIDIA L4", 23034 << 20, "8.9")
    assert a100.index == 1 and a100.compute_capability is None and a100.memory_free_bytes == 1024 << 20
    hw = detect(read_cpuinfo=lambda: ARM_PI5, run_nvidia_smi=lambda: "", machine="aarch64",
                onnx_providers=lambda: (), llama_offload=lambda: False, query_nvml=lambda: None)
    assert hw.gpus == () and hw.cpu.architecture == "aarch64" and "neon" in hw.cpu.features
    assert offer(hw).unavailable["gpu"] == "no NVIDIA GPU found"


def test_placement_follows_the_hardware():
    l4 = parse_nvidia_smi(SMI)[:1]
    on_gpu = place(box(l4, offload=True))
    assert (on_gpu.device, on_gpu.num_gpu, on_gpu.num_batch, on_gpu.num_parallel) == ("gpu", ALL_LAYERS, 2048, 8)
    assert offer(box(l4, offload=True)).unavailable["gpu"] is None
    cpu_build = place(box(l4, offload=False))
    assert cpu_build.num_gpu == 0 and cpu_build.num_batch == 512
    assert any("NVIDIA L4 found, but this llama.cpp build cannot offload" in r for r in cpu_build.reasons)
    tight = place(box(available=1 * GIB))
    assert tight.kv_type == "q8_0" and any("halves KV memory" in r for r in tight.reasons)
    assert place(box()).kv_type == "f16" and place(box()).num_thread == 8
    assert offer(box(providers=("QNNExecutionProvider", "CPUExecutionProvider"))).unavailable["npu"] is None
    assert "not installed" in offer(box()).unavailable["npu"]


def test_gpu_type_is_what_offer_and_placement_share():
    g = GPU(0, "NVIDIA T4", "nvidia", 15 << 30, 14 << 30, "535", "7.5")
    assert "T4" in place(box([g], offload=True)).reasons[1]


def test_nvml_answers_first_and_nvidia_smi_only_without_it():
    t4 = GPU(0, "NVIDIA T4", "nvidia", 15 << 30, 14 << 30, "535", "7.5")
    probes = {"read_cpuinfo": lambda: X86_AVX512, "machine": "x86_64", "onnx_providers": lambda: (),
              "llama_offload": lambda: True}
    assert detect(query_nvml=lambda: (t4,), run_nvidia_smi=lambda: SMI, **probes).gpus == (t4,)
    assert [g.name for g in detect(query_nvml=lambda: None, run_nvidia_smi=lambda: SMI, **probes).gpus] == [
        "NVIDIA L4", "NVIDIA A100-SXM4-40GB"]
    assert detect(query_nvml=lambda: (), run_nvidia_smi=lambda: SMI, **probes).gpus == ()  # NVML: no GPU


def test_gpu_offload_only_when_the_model_fits():
    l4 = parse_nvidia_smi(SMI)[:1]  # 22500 MiB free
    fits = place(box(l4, offload=True), model_bytes=2 * GIB, kv_bytes=GIB)
    assert (fits.device, fits.num_gpu) == ("gpu", ALL_LAYERS) and "fit in 22.0 GiB free" in fits.reasons[1]
    too_big = place(box(l4, offload=True), model_bytes=20 * GIB, kv_bytes=2 * GIB)
    assert (too_big.device, too_big.num_gpu, too_big.num_batch) == ("cpu", 0, 512)
    assert "needs 23.0 GiB of GPU memory" in too_big.reasons[1] and "22.0 GiB free" in too_big.reasons[1]
    pair = (l4[0], GPU(1, "NVIDIA L4", "nvidia", 23034 << 20, 22 * GIB, "550.54.15", "8.9"))
    both = place(box(pair, offload=True), model_bytes=30 * GIB, kv_bytes=2 * GIB)
    assert both.device == "gpu" and "all layers on 2 GPUs" in both.reasons[1]  # llama.cpp splits layers over both
    unified = GPU(0, "NVIDIA GB10", "nvidia", 0, 0, "580", "12.1")  # reports no memory figures
    assert place(box([unified], offload=True), model_bytes=20 * GIB).device == "gpu"
    assert "fit is not checked" in place(box(l4, offload=True)).reasons[1]  # size unknown: llama.cpp will say


def test_kv_cache_type_follows_host_memory_only_on_cpu():
    l4 = parse_nvidia_smi(SMI)[:1]
    assert place(box(available=1 * GIB)).kv_type == "q8_0"
    on_gpu = place(box(l4, offload=True, available=1 * GIB))
    assert on_gpu.kv_type == "f16" and "GPU memory" in on_gpu.reasons[-1]


def test_two_core_machine_keeps_threads_at_cores_and_parallel_automatic():
    small = Hardware(cpu=CPU("Cortex-A76", "aarch64", 2, 2, ("neon", "dotprod")), ram_total_bytes=4 * GIB,
                     ram_available_bytes=3 * GIB, gpus=(), onnx_providers=(), llama_gpu_offload=False)
    p = place(small)
    assert (p.num_thread, p.num_parallel, p.num_batch, p.kv_type) == (2, 0, 512, "f16")
    assert "at most 8" in p.reasons[3]


@pytest.mark.slow
def test_asking_for_the_gpu_on_a_machine_without_one_runs_on_the_cpu_and_says_so(cli_home):
    """SLMOPS_NUM_GPU set by hand on this GPU-less machine: the model answers from the CPU, and `/api/ps`,
    `slmops ps` and /metrics say it fell back."""
    import httpx
    from conftest import Server

    srv = Server(cli_home, SLMOPS_NUM_GPU="99")
    try:
        r = httpx.post(srv.url + "/api/generate", json={"model": "smollm2:135m", "prompt": "hi", "stream": False,
                                                        "options": {"num_predict": 2}}, timeout=120)
        assert r.status_code == 200 and r.json()["done"]
        (model,) = httpx.get(srv.url + "/api/ps", timeout=30).json()["models"]
        assert model["fallback"] == ("GPU offload was asked for (num_gpu 99), but llama.cpp has none here; "
                                     "on the CPU")
        shown = run_cli("ps", home=cli_home, SLMOPS_HOST=f"127.0.0.1:{srv.port}").stdout
        assert "smollm2:135m: GPU offload was asked for (num_gpu 99)" in shown
        assert 'slmops_accelerator_fallback{model="smollm2:135m"} 1.0' in httpx.get(srv.url + "/metrics").text
    finally:
        srv.stop()
