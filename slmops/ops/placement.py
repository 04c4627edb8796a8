"""Engine settings for this machine, each with the reason it was chosen; ``serve`` logs them, ``slmops hw``
prints them, and any ``SLMOPS_*`` setting (or the deployment config) given explicitly wins over them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slmops.ops.hw import Hardware, gpu_unavailable

ALL_LAYERS = 999  # llama.cpp offloads min(n, layers): any number past the layer count means all
TIGHT_RAM = 2 << 30


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


def place(hw: Hardware) -> Placement:
    reasons = []
    threads = hw.cpu.physical_cores
    reasons.append(f"threads {threads}: one per physical core (decoding is memory-bound; a second thread on a "
                   "core adds contention, not speed)")
    blocked = gpu_unavailable(hw)
    if blocked is None:
        gpu = hw.gpus[0]
        device, num_gpu, batch, parallel = "gpu", ALL_LAYERS, 2048, 8
        reasons.append(f"all layers on {gpu.name}: a small model fits in its memory and runs faster there")
        reasons.append("batch 2048: a GPU takes long prompts in few large steps")
        reasons.append("parallel 8: a GPU decodes many sequences in the time of one")
    else:
        device, num_gpu, batch, parallel = "cpu", 0, 512, 0
        reasons.append(f"no GPU offload: {blocked}")
        reasons.append("batch 512: prompt steps short enough to interleave with streaming sequences on a CPU")
        reasons.append("parallel auto: as many sequences as fit in free memory, at most 8 (aggregate speed rises "
                       "to 8 sequences even on 2 cores)")
    if hw.ram_available_bytes < TIGHT_RAM:
        kv = "q8_0"
        reasons.append(f"KV cache q8_0: only {hw.ram_available_bytes >> 20} MiB free, and q8_0 halves KV memory")
    else:
        kv = "f16"
        reasons.append("KV cache f16: memory is ample, and f16 keeps attention exact")
    return Placement(device=device, num_thread=threads, num_gpu=num_gpu, num_batch=batch, kv_type=kv,
                     num_parallel=parallel, reasons=reasons)
