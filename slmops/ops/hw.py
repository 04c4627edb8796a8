"""What this machine offers a model: CPU and its SIMD features, memory, NVIDIA GPUs, ONNX Runtime providers.

Parsers take the raw text (``/proc/cpuinfo``, ``nvidia-smi`` CSV) so the GPU and ARM cases are tested with the
text such machines print; :func:`detect` takes its readers as arguments for the same reason. GPUs come from NVML
when ``pynvml`` is installed, else from ``nvidia-smi``. Nothing here fails for lack of hardware: neither of them,
no GPU; no ``onnxruntime``, no providers.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from slmops.store.variants import Offer

# The flags that decide which llama.cpp kernels run, under one spelling across x86 and ARM.
_X86 = {"avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw",
        "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16", "avx_vnni": "avx_vnni", "amx_int8": "amx_int8",
        "sse4_2": "sse4_2"}
_ARM = {"asimd": "neon", "asimddp": "dotprod", "fphp": "fp16", "asimdhp": "fp16", "i8mm": "i8mm", "sve": "sve",
        "sve2": "sve2", "bf16": "bf16"}
NPU_PROVIDERS = ("QNNExecutionProvider", "VitisAIExecutionProvider", "OpenVINOExecutionProvider")
MIB = 1 << 20


@dataclass(frozen=True)
class CPU:
    model: str
    architecture: str
    physical_cores: int
    logical_cores: int
    features: tuple[str, ...]


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    vendor: str
    memory_total_bytes: int
    memory_free_bytes: int
    driver: str | None
    compute_capability: str | None


@dataclass(frozen=True)
class Hardware:
    cpu: CPU
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GPU, ...]
    onnx_providers: tuple[str, ...]
    llama_gpu_offload: bool  # this llama.cpp build can put layers on a GPU
    onnx_genai: str | None = None  # the installed onnxruntime-genai's version; None: not installed

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_cpuinfo(text: str, machine: str) -> tuple[str, tuple[str, ...]]:
    """(model name, normalised SIMD features) from ``/proc/cpuinfo`` of an x86 or ARM Linux machine."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    arm = machine.startswith(("aarch64", "arm"))
    table = _ARM if arm else _X86
    raw = (fields.get("Features") if arm else fields.get("flags")) or fields.get("flags") or ""
    features = sorted({table[f] for f in raw.split() if f in table})
    if arm and machine == "aarch64" and "neon" not in features:
        features.append("neon")  # mandatory in ARMv8-A
    model = fields.get("model name") or fields.get("Hardware") or fields.get("Model") or ""
    if not model and fields.get("CPU part"):
        model = f"ARM CPU part {fields['CPU part']}"
    return model or platform.processor() or machine, tuple(sorted(features))


def parse_nvidia_smi(text: str) -> tuple[GPU, ...]:
    """GPUs from ``nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version,compute_cap
    --format=csv,noheader,nounits``; fields it cannot report (``[N/A]``) become None or 0."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        known = [None if p in ("", "[N/A]", "N/A") else p for p in parts] + [None] * 2
        try:
            index = int(known[0] or len(gpus))
        except ValueError:
            continue
        gpus.append(GPU(index=index, name=known[1] or "NVIDIA GPU", vendor="nvidia",
                        memory_total_bytes=_mib(known[2]), memory_free_bytes=_mib(known[3]), driver=known[4],
                        compute_capability=known[5]))
    return tuple(gpus)


def _mib(value: str | None) -> int:
    try:
        return int(float(value)) * MIB if value else 0
    except ValueError:
        return 0


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _nvidia_smi() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ""
    try:
        return subprocess.run([exe, "--query-gpu=index,name,memory.total,memory.free,driver_version,compute_cap",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _onnx_providers() -> tuple[str, ...]:
    from slmops.engine.onnx import runtime_providers  # the one package that imports ONNX Runtime
    return runtime_providers()


def _onnx_genai() -> str | None:
    """The ONNX Runtime GenAI engine's version, read from its metadata: importing it would load native code."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("onnxruntime-genai")
    except PackageNotFoundError:
        return None


def _llama_offload() -> bool:
    from slmops.engine.llamacpp import supports_gpu_offload  # loads llama.cpp only now, and only if installed
    return supports_gpu_offload()


def _nvml() -> tuple[GPU, ...] | None:
    """GPUs through NVML when ``pynvml`` (nvidia-ml-py) is installed: no process to start, and it works where
    ``nvidia-smi`` is not on PATH. None when the library or the driver is absent, so ``nvidia-smi`` is asked."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - NVMLError subclasses: no driver, no device; not an error here
        return None
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        return tuple(_nvml_gpu(pynvml, i, driver) for i in range(pynvml.nvmlDeviceGetCount()))
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _nvml_gpu(nvml: Any, index: int, driver: str) -> GPU:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    try:
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        total, free = int(mem.total), int(mem.free)
    except nvml.NVMLError:  # unified-memory boards (Jetson, GB10) report none
        total = free = 0
    try:
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        capability: str | None = f"{major}.{minor}"
    except nvml.NVMLError:
        capability = None
    return GPU(index=index, name=_text(nvml.nvmlDeviceGetName(handle)), vendor="nvidia", memory_total_bytes=total,
               memory_free_bytes=free, driver=driver, compute_capability=capability)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older pynvml returns bytes


def detect(read_cpuinfo: Callable[[], str] = _read_cpuinfo, run_nvidia_smi: Callable[[], str] = _nvidia_smi,
           machine: str | None = None, onnx_providers: Callable[[], tuple[str, ...]] = _onnx_providers,
           llama_offload: Callable[[], bool] = _llama_offload,
           query_nvml: Callable[[], tuple[GPU, ...] | None] = _nvml,
           genai: Callable[[], str | None] = _onnx_genai, runtimes: bool = True) -> Hardware:
    """This machine, read through the given probes (the defaults read the real one; tests pass recorded text).
    NVML is asked first and ``nvidia-smi`` only when NVML is not installed or cannot start. Without ``runtimes``
    (the server's placement) the engines are not loaded to ask them: no ONNX Runtime providers, and llama.cpp's
    offload support only where there is a GPU to offload to, so a server process holds no native engine."""
    import psutil  # only where the machine is read (not for the names other modules import from here)

    machine = machine or platform.machine()
    model, features = parse_cpuinfo(read_cpuinfo(), machine)
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    mem = psutil.virtual_memory()
    cpu = CPU(model=model, architecture=machine, physical_cores=psutil.cpu_count(logical=False) or logical,
              logical_cores=logical, features=features)
    gpus = query_nvml()
    if gpus is None:
        gpus = parse_nvidia_smi(run_nvidia_smi())
    return Hardware(cpu=cpu, ram_total_bytes=mem.total, ram_available_bytes=mem.available, gpus=gpus,
                    onnx_providers=onnx_providers() if runtimes else (),
                    llama_gpu_offload=llama_offload() if runtimes or gpus else False, onnx_genai=genai())


def gpu_unavailable(hw: Hardware) -> str | None:
    """Why layers cannot go to a GPU here, or None when they can."""
    if not hw.gpus:
        return "no NVIDIA GPU found"
    if not hw.llama_gpu_offload:
        return (f"{hw.gpus[0].name} found, but this llama.cpp build cannot offload to a GPU; install "
                "llama-cpp-python built with CUDA")
    return None


def offer(hw: Hardware) -> Offer:
    """What :func:`slmops.store.variants.choose` may pick from on this machine."""
    npu = next((p for p in hw.onnx_providers if p in NPU_PROVIDERS), None)
    npu_reason = None if npu else ("no NPU found (ONNX Runtime reports no NPU provider)" if hw.onnx_providers
                                   else "no NPU found (ONNX Runtime is not installed)")
    formats = {"gguf", "onnx"} if hw.onnx_genai else {"gguf"}
    return Offer({"cpu": None, "gpu": gpu_unavailable(hw), "npu": npu_reason}, frozenset(hw.cpu.features),
                 frozenset(formats))
