"""Engine settings for this machine, each with the reason it was chosen; ``serve`` logs them, ``slmops hw``
prints them, and any ``SLMOPS_*`` setting (or the deployment config) given explicitly wins over them.

The policy, and why: one thread per physical core (llama.cpp decoding is memory-bound, hyperthreads only contend);
every layer on the GPU when llama.cpp can offload and the model fits, else none (a partial offload would need the
model's layer count and per-layer size; not done yet); large prompt batches and 8 sequences on a GPU, which has the
parallelism for them; 512-token batches and a memory-derived sequence count on a CPU; an f16 KV cache unless host
memory is short.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slmops.ops.hw import Hardware, gpu_unavailable

ALL_LAYERS = 999  # llama.cpp offloads min(n, layers): any number past the layer count means all
TIGHT_RAM = 2 << 30  # host memory under which the KV cache is quantized
GPU_HEADROOM = 1 << 30  # per GPU: CUDA context, cuBLAS workspace and llama.cpp compute buffers
GIB = 1 << 30


@dataclass
class Placement:
    device: str
    num_thread: int
    num_gpu: int
    num_batch: int
    kv_type: str
    num_parallel: int  # 0: as many whole contexts as fit in free memory (at most 8)
    reasons: list[str] = field(default_factory=list)

    def as_config_fields(self) -> dict[str, Any]:
        return {"num_thread": self.num_thread, "num_gpu": self.num_gpu, "num_batch": self.num_batch,
                "kv_type": self.kv_type, "num_parallel": self.num_parallel}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parallel = self.num_parallel or "auto"
        gpu = f", {'all' if self.num_gpu >= ALL_LAYERS else self.num_gpu} layers on GPU" if self.num_gpu else ""
        return (f"placement: {self.device}, {self.num_thread} threads{gpu}, batch {self.num_batch}, "
                f"KV {self.kv_type}, parallel {parallel}")


def place(hw: Hardware, model_bytes: int | None = None, kv_bytes: int = 0) -> Placement:
    """The engine settings for ``hw``, one reason per choice.

    ``model_bytes`` (the GGUF's size) and ``kv_bytes`` (its KV cache for the contexts it will hold, which only a
    caller that read the model's shape can know) let the GPU choice check that they fit in free GPU memory; without
    them a GPU is used whenever llama.cpp can offload to one, and llama.cpp reports a model too big at load.
    """
    threads = hw.cpu.physical_cores
    reasons = [(f"threads {threads}: one per physical core (decoding is memory-bound; a second thread on a core "
                "adds contention, not speed)")]
    blocked = gpu_unavailable(hw) or _gpu_too_small(hw, model_bytes, kv_bytes)
    if blocked is None:
        device, num_gpu, batch, parallel = "gpu", ALL_LAYERS, 2048, 8
        reasons.append(f"all layers on {_gpu_names(hw)}: {_fit(hw, model_bytes, kv_bytes)}")
        reasons.append("batch 2048: a GPU takes long prompts in few large steps")
        reasons.append("parallel 8: a GPU decodes many sequences in the time of one")
    else:
        device, num_gpu, batch, parallel = "cpu", 0, 512, 0
        reasons.append(f"no GPU offload: {blocked}")
        reasons.append("batch 512: prompt steps short enough to interleave with streaming sequences on a CPU")
        reasons.append("parallel auto: as many sequences as fit in free memory, at most 8 (aggregate speed rises "
                       "to 8 sequences even on 2 cores)")
    kv, why = _kv_type(hw, device)
    reasons.append(why)
    return Placement(device=device, num_thread=threads, num_gpu=num_gpu, num_batch=batch, kv_type=kv,
                     num_parallel=parallel, reasons=reasons)


def _gpu_too_small(hw: Hardware, model_bytes: int | None, kv_bytes: int) -> str | None:
    """Why the model does not fit in free GPU memory, or None. llama.cpp spreads the layers over every visible GPU,
    so their free memory adds up; each also needs :data:`GPU_HEADROOM` for its CUDA context and compute buffers."""
    if model_bytes is None or not _memory_known(hw):
        return None
    need = model_bytes + kv_bytes + GPU_HEADROOM * len(hw.gpus)
    free = sum(g.memory_free_bytes for g in hw.gpus)
    if need <= free:
        return None
    return (f"the model needs {need / GIB:.1f} GiB of GPU memory (weights, KV cache, headroom) but "
            f"{_gpu_names(hw)} has {free / GIB:.1f} GiB free; free some or pick a smaller quantization")


def _fit(hw: Hardware, model_bytes: int | None, kv_bytes: int) -> str:
    if model_bytes is None:
        return "llama.cpp can offload to it (model size not given, so fit is not checked; one too big fails at load)"
    if not _memory_known(hw):
        return "llama.cpp can offload to it (the GPU reports no memory figures, so fit is not checked)"
    free = sum(g.memory_free_bytes for g in hw.gpus)
    return f"the model and its KV cache ({(model_bytes + kv_bytes) / GIB:.1f} GiB) fit in {free / GIB:.1f} GiB free"


def _memory_known(hw: Hardware) -> bool:
    return all(g.memory_total_bytes for g in hw.gpus)  # unified-memory boards report none


def _gpu_names(hw: Hardware) -> str:
    return hw.gpus[0].name if len(hw.gpus) == 1 else f"{len(hw.gpus)} GPUs"


def _kv_type(hw: Hardware, device: str) -> tuple[str, str]:
    """q8_0 halves the KV cache at a small cost in accuracy, so it is worth it only when host memory is short; on a
    GPU the cache lives in GPU memory beside the layers, so host memory does not decide it."""
    if device == "cpu" and hw.ram_available_bytes < TIGHT_RAM:
        return "q8_0", f"KV cache q8_0: only {hw.ram_available_bytes >> 20} MiB free, and q8_0 halves KV memory"
    where = "it lives in GPU memory beside the layers" if device == "gpu" else "memory is ample"
    return "f16", f"KV cache f16: {where}, and f16 keeps attention exact"
