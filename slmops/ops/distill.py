"""``slmops distill``: heal a pruned (or quantized) student against its teacher, the model it was made from.

The student is trained on the CPU against the teacher's token distributions over a shipped text
(:mod:`slmops.ops.training`, in a child process), saved as Hugging Face weights, turned back into a GGUF by
llama.cpp's own converter (from the llama-cpp-python sdist the engine was built from), then quantized by llama.cpp
to the student's own type from float16, so the healed model is as small as the student and is compared with it
like for like. The new model keeps the student's template, parameters and licence; its config records the teacher,
the student and the training plan, so where it came from can be traced.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slmops.ops import children
from slmops.ops.back_to_gguf import gguf_weights, own_type, store_hf
from slmops.ops.shrink import calibration_text
from slmops.store import manifests as mt
from slmops.store.manifests import Manifest
from slmops.store.store import Store
from slmops.types.errors import InvalidInput
from slmops.types.name import ModelName

Progress = Callable[[dict[str, Any]], None]
Status = Callable[[str], None]


@dataclass(frozen=True)
class DistillPlan:
    steps: int = 40
    seq_len: int = 256
    batch: int = 2
    lr: float = 5e-5
    temperature: float = 1.0
    seed: int = 0
    threads: int = 0  # 0: PyTorch's default


@dataclass
class Distilled:
    manifest: Manifest
    losses: list[float]
    seconds: float
    tokens_per_step: int


def distill_model(store: Store, teacher: ModelName, student: ModelName, dst: ModelName, plan: DistillPlan,
                  text: str | None = None, progress: Progress | None = None,
                  status: Status = lambda s: None) -> Distilled:
    """``dst``: ``student`` trained toward ``teacher`` on ``text`` (the shipped calibration text by default)."""
    if dst in (teacher, student):
        raise InvalidInput("distill writes a new model; give a name other than the teacher's or the student's")
    if plan.steps < 1 or plan.seq_len < 16 or plan.batch < 1 or not plan.lr > 0:
        raise InvalidInput("steps and batch must be at least 1, the window at least 16 tokens, the rate above 0")
    children.require(("torch", "transformers", "sentencepiece"), "distilling", "convert")
    _, t_layer = gguf_weights(store, teacher, "distill")
    s_manifest, s_layer = gguf_weights(store, student, "distill")
    qtype = own_type(store, student)
    with tempfile.TemporaryDirectory(prefix="slmops-distill-") as tmp:
        work = Path(tmp)
        (work / "text.txt").write_text(text or calibration_text())
        with store.blobs.plain(t_layer.blob, teacher.display) as t, store.blobs.plain(s_layer.blob, student.display) as s:
            status(f"distilling {student.display} against {teacher.display}")
            result = children.run("slmops.ops.training", ["distill", str(Path(t).absolute()),
                                                          str(Path(s).absolute()), "text.txt", "model",
                                                          json.dumps(asdict(plan))], work, "distilling", progress)
        if not result or "losses" not in result:
            raise InvalidInput("distilling gave no result")
        with store.writing():
            new, info = store_hf(store, work / "model", qtype, dst.display, work, status)
            layers = [new if x.media_type == mt.MODEL else x for x in s_manifest.layers]
            trained = {**asdict(plan), "loss_first": result["losses"][0], "loss_last": result["losses"][-1]}
            config = store.config_layer(info, layers, {"distilled_from": teacher.display,
                                                       "student": student.display, "distill": trained})
            written = store.write_manifest(dst, layers, config)
    return Distilled(written, result["losses"], result["seconds"], result["tokens_per_step"])


def plot(result: dict[str, Any], path: Path) -> None:
    """The loss curve, and (with a report) teacher, student and result side by side: one PNG for a README."""
    from slmops.ops.charts import training_chart

    cells = [[r["model"], f"{r['perplexity']:.2f}", "{}/{}".format(*r["golden"]), f"{r['decode_tokens_per_s']:.1f}",
              f"{r['size_bytes'] / 1e6:.0f} MB"] for r in result.get("report") or []]
    training_chart(path, result["losses"], f"distilling {result['student']}", "KL(teacher || student)",
                   ["model", "perplexity", "golden", "decode tok/s", "size"], cells, [0.42, 0.15, 0.11, 0.17, 0.13])
