"""``slmops tune``: a LoRA adapter trained on the answers people rated well, on the CPU, as a new model that is the
base model plus that adapter.

The dataset (:mod:`slmops.ops.dataset`) is rendered with the base model's own chat template, SYSTEM and MESSAGEs, as
serving renders it; the adapter is trained in a child process (:mod:`slmops.ops.training`, ``peft``), converted to
a GGUF adapter by llama.cpp's ``convert_lora_to_gguf.py`` from the llama-cpp-python sdist the engine was built
from, and stored as an ``ADAPTER`` layer over the base model's own layers, which are kept as they are: the new model
costs the store (and a device's download) only the adapter. A base that already carries adapters (an earlier tuned
release) has them replaced, not stacked: the adapter is trained on the weights alone. With ``merge`` the adapter is
folded into the weights instead, and the model quantized back to the base's type (:mod:`slmops.ops.back_to_gguf`):
a whole model to ship, but llama.cpp then decodes at the base's speed, where an adapter costs extra matrix
products at every token.

The new model's config says where it came from: the base (name and manifest digest), the dataset's digest, counts,
releases and the ids of the feedback it was trained on and held out on, and the training plan with its first and
last loss. ``slmops release --model`` publishes it through the CI/CD pipeline, whose gate compares it with the
current release on the dataset's held-out conversations and the release's golden prompts.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slmops.ops import children
from slmops.ops.back_to_gguf import converter, gguf_weights, own_type, store_hf
from slmops.ops.dataset import Dataset, conversations, summary
from slmops.store import manifests as mt
from slmops.store.manifests import Layer, Manifest
from slmops.store.sources import lora_to_gguf
from slmops.store.store import Store
from slmops.types.errors import InvalidInput
from slmops.types.name import ModelName

Progress = Callable[[dict[str, Any]], None]
Status = Callable[[str], None]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TunePlan:
    steps: int = 30
    lr: float = 2e-4
    rank: int = 8
    alpha: float = 16.0
    batch: int = 4
    max_len: int = 512  # tokens of one example; a longer one keeps its end (the answer)
    seed: int = 0
    threads: int = 0  # 0: PyTorch's default
    targets: tuple[str, ...] = field(default=TARGETS)
    merge: bool = False  # fold the adapter into the weights, quantized back to the base's type

    def check(self) -> None:
        if self.steps < 1 or self.batch < 1 or self.rank < 1 or not self.lr > 0 or not self.alpha > 0:
            raise InvalidInput("steps, batch and rank must be at least 1; the rate and alpha above 0")
        if self.max_len < 32:
            raise InvalidInput("--max-len must be at least 32 tokens")


@dataclass
class Tuned:
    manifest: Manifest
    losses: list[float]
    seconds: float
    examples: int
    trainable_parameters: int
    adapter_bytes: int | None  # None: merged into the weights
    replaced_adapters: int


def tune_model(store: Store, base: ModelName, dataset: Dataset, dst: ModelName, plan: TunePlan,
               progress: Progress | None = None, status: Status = lambda s: None) -> Tuned:
    """``dst``: ``base`` with a LoRA adapter trained on ``dataset``'s training examples."""
    from slmops.engine.client import spec_from_store
    from slmops.engine.model import DEFAULT_TEMPLATE, served_messages

    if dst == base:
        raise InvalidInput("tune writes a new model; give a name other than the base's with --to")
    plan.check()
    children.require(("torch", "transformers", "peft", "sentencepiece"), "fine-tuning", "convert")
    manifest, weights = gguf_weights(store, base, "tune")
    spec = spec_from_store(store, base)
    qtype = own_type(store, base, "; tune it without --merge") if plan.merge else ""
    train = [served_messages(spec, c[:-1]) + c[-1:] for c in conversations(dataset.train)]  # as serving renders
    examples = {"template": spec.template or DEFAULT_TEMPLATE, "train": train}
    old_adapters = [x for x in manifest.layers if x.media_type == mt.ADAPTER]
    with tempfile.TemporaryDirectory(prefix="slmops-tune-") as tmp:
        work = Path(tmp)
        (work / "examples.json").write_text(json.dumps(examples))
        with store.blobs.plain(weights.blob, base.display) as gguf:
            status(f"training a LoRA adapter on {len(dataset.train)} rated answers")
            result = children.run("slmops.ops.training", ["lora", str(Path(gguf).absolute()), "examples.json",
                                                          "out", json.dumps(asdict(plan))], work, "fine-tuning",
                                  progress)
        if not result or "losses" not in result:
            raise InvalidInput("fine-tuning gave no result")
        kept = [x for x in manifest.layers if x.media_type != mt.ADAPTER]
        with store.writing():
            if plan.merge:
                new, info = store_hf(store, work / "out" / "merged", qtype, dst.display, work, status)
                layers, added = [new if x.media_type == mt.MODEL else x for x in kept], None
            else:
                status("converting the adapter to GGUF with llama.cpp's converter")
                adapter = lora_to_gguf(sys.executable, converter(work), work / "out" / "adapter",
                                       work / "out" / "base", work / "adapter.gguf", f"the adapter for {dst.display}")
                stored, _ = store.import_derived(lambda out: shutil.copyfile(adapter, out),
                                                 f"adapter of {dst.display}")
                layer = Layer(mediaType=mt.ADAPTER, digest=stored.digest, size=stored.size)
                layers, added, info = kept + [layer], layer.size, store.inspect(base)
            provenance = {
                "tuned_from": {"model": base.display, "digest": str(store.manifests.digest(base)),
                               "replaced_adapters": [x.digest for x in old_adapters]},
                "dataset": summary(dataset),
                "tune": {**asdict(plan), "loss_first": result["losses"][0], "loss_last": result["losses"][-1],
                         "examples": result["examples"]},
            }
            config = store.config_layer(info, layers, provenance)
            written = store.write_manifest(dst, layers, config)
    return Tuned(written, result["losses"], result["seconds"], result["examples"], result["trainable_parameters"],
                 added, len(old_adapters))


def provenance(store: Store, name: ModelName) -> dict[str, Any] | None:
    """What a tuned model's config says it came from, or None for a model that was not tuned here."""
    config = store.config(name)
    if "tuned_from" not in config:
        return None
    return {k: config[k] for k in ("tuned_from", "dataset", "tune") if k in config}


def notes(p: dict[str, Any]) -> str:
    """A release's notes for a tuned model: its base and the feedback behind it, in one line."""
    d = p["dataset"]
    rels = ", ".join(f"{r} ({n})" for r, n in sorted(d["releases"].items()))
    return (f"LoRA on {d['counts']['train']} well-rated answers ({d['counts']['heldout']} held out) from {rels}; "
            f"base {p['tuned_from']['model']}; dataset {d['digest']}")
