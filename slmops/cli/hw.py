"""``slmops hw``: what this machine offers a model, and the engine settings chosen from it."""

from __future__ import annotations

import json

import typer

from slmops.cli.common import console


def hw_cmd(json_: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Show CPU, SIMD features, memory, GPUs and ONNX Runtime providers, and the placement chosen from them."""
    from slmops.ops.hw import detect
    from slmops.ops.placement import place

    hw = detect()
    placement = place(hw)
    if json_:
        print(json.dumps({"hardware": hw.to_json(), "placement": placement.to_json()}, indent=2))
        return
    gib = 1 << 30
    rows = [("CPU", hw.cpu.model), ("architecture", hw.cpu.architecture),
            ("cores", f"{hw.cpu.physical_cores} physical, {hw.cpu.logical_cores} logical"),
            ("SIMD", " ".join(hw.cpu.features) or "none detected"),
            ("RAM", f"{hw.ram_total_bytes / gib:.1f} GiB, {hw.ram_available_bytes / gib:.1f} GiB available")]
    for g in hw.gpus:
        memory = (f"{g.memory_total_bytes / gib:.1f} GiB ({g.memory_free_bytes / gib:.1f} free)"
                  if g.memory_total_bytes else "memory not reported")
        rows.append((f"GPU {g.index}",
                     f"{g.name}, {memory}, driver {g.driver or '?'}, compute {g.compute_capability or '?'}"))
    if not hw.gpus:
        rows.append(("GPU", "none found"))
    rows.append(("llama.cpp offload", "yes" if hw.llama_gpu_offload else "no (CPU build)"))
    rows.append(("ONNX Runtime", ", ".join(hw.onnx_providers) or "not installed"))
    rows.append(("ONNX Runtime GenAI", hw.onnx_genai or "not installed (pip install 'slmops[onnx]')"))
    for k, v in rows:
        console.print(f"{k:<20}{v}", markup=False, soft_wrap=True)
    console.print(f"\n{placement.summary()}", markup=False, soft_wrap=True)
    for reason in placement.reasons:
        console.print(f"  - {reason}", markup=False, soft_wrap=True)
