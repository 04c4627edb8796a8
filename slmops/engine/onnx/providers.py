"""Execution providers: which accelerators ONNX Runtime has here, and the order a model tries them in.

What is present comes from ``onnxruntime.get_available_providers()``: the genai package's own ``is_*_available()``
answer True for providers its build cannot load (QNN, OpenVINO and WebGPU on the CPU wheel), so they cannot pick
one. Even a listed provider may fail to load a model (a missing driver library, a model built for another
device); the loader tries the next and finally the CPU, which is always present and always last.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmops.types.errors import ConfigError

NPU, GPU, CPU = "npu", "gpu", "cpu"


@dataclass(frozen=True)
class Provider:
    name: str  # short, as a user names it: "cuda", "qnn", "cpu"
    ort: str  # ONNX Runtime's name: "CUDAExecutionProvider"
    genai: str | None  # what ``og.Config.append_provider`` takes (case matters); None: the CPU, nothing appended
    accelerator: str  # npu | gpu | cpu


# In the order a model tries them: NPUs, then GPUs, then the CPU.
KNOWN: tuple[Provider, ...] = (
    Provider("qnn", "QNNExecutionProvider", "QNN", NPU),
    Provider("vitisai", "VitisAIExecutionProvider", "VitisAI", NPU),
    Provider("openvino", "OpenVINOExecutionProvider", "OpenVINO", NPU),
    Provider("nvtensorrtrtx", "NvTensorRTRTXExecutionProvider", "NvTensorRtRtx", GPU),
    Provider("tensorrt", "TensorrtExecutionProvider", "NvTensorRtRtx", GPU),
    Provider("cuda", "CUDAExecutionProvider", "cuda", GPU),
    Provider("rocm", "ROCMExecutionProvider", "rocm", GPU),  # genai 0.18 has none: it fails, saying so
    Provider("migraphx", "MIGraphXExecutionProvider", "MIGraphX", GPU),
    Provider("dml", "DmlExecutionProvider", "DML", GPU),
    Provider("coreml", "CoreMLExecutionProvider", "CoreML", GPU),
    Provider("webgpu", "WebGpuExecutionProvider", "WebGPU", GPU),
    Provider("cpu", "CPUExecutionProvider", None, CPU),
)
_BY_NAME = {**{p.ort.lower(): p for p in KNOWN}, **{p.name: p for p in KNOWN}}
_BY_NAME["directml"] = _BY_NAME["dml"]


def runtime_providers() -> tuple[str, ...]:
    """ONNX Runtime's own list (``CUDAExecutionProvider``...); empty when it is not installed or broken."""
    try:
        import onnxruntime
        return tuple(onnxruntime.get_available_providers())
    except Exception:  # noqa: BLE001 - no (or a broken) runtime offers nothing but what every model runs on
        return ()


def available() -> tuple[Provider, ...]:
    """The providers this ONNX Runtime has, in trying order (the CPU last, and always there)."""
    present = set(runtime_providers())
    return tuple(p for p in KNOWN if p.ort in present or p.accelerator == CPU)


def has_accelerator(found: tuple[Provider, ...] | None = None) -> bool:
    """Whether a GPU or NPU provider is present: layers can leave the CPU here."""
    return any(p.accelerator != CPU for p in (available() if found is None else found))


def lookup(name: str) -> Provider:
    """A provider by its short or ONNX Runtime name, in any case (a ``ConfigError`` names the known ones)."""
    found = _BY_NAME.get(name.strip().lower())
    if found is None:
        raise ConfigError(f"unknown ONNX Runtime execution provider {name!r}; known: "
                          + ", ".join(p.name for p in KNOWN))
    return found


def order(preferred: tuple[str, ...] | None, allow_gpu: bool,
          found: tuple[Provider, ...] | None = None) -> tuple[Provider, ...]:
    """The providers to try, first to last. Detected (of those ``found``, default :func:`available`): NPUs, which
    exist for this and are always tried, then GPUs when layers may leave the CPU (``allow_gpu``: ``num_gpu`` is not
    0). ``preferred`` (``SLMOPS_ONNX_PROVIDERS``, in the user's order) replaces detection and is tried as given:
    it is how a provider the runtime does not list is forced, for a build that loads it anyway. The CPU ends every
    order; names after it are never tried."""
    cpu = _BY_NAME["cpu"]
    if preferred:
        chosen = [lookup(n) for n in preferred]
    else:
        chosen = [p for p in sorted(available() if found is None else found, key=KNOWN.index)
                  if p.accelerator == NPU or (allow_gpu and p.accelerator == GPU)]
    out: list[Provider] = []
    for p in chosen:
        if p.accelerator == CPU:
            break
        if all(q.genai != p.genai for q in out):  # TensorRT and TensorRT-RTX load through one genai provider
            out.append(p)
    return (*out, cpu)
