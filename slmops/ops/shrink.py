"""Structured pruning: a new model without the transformer blocks that change its hidden state least.

On a CPU only dropping whole blocks makes llama.cpp faster and smaller: each block dropped saves its share of
every token's matrix products and of the KV cache. (Unstructured or 2:4 sparsity leaves the dense kernels doing
the same work.) Which blocks: the lowest mean angular distance between a block's input and output on calibration
text (:mod:`slmops.ops.importance`). The cut itself is llama.cpp's quantizer in copy mode with ``prune_layers``:
the kept tensors keep their type and bytes, the rest are renumbered, so the new model differs from its source by
the dropped blocks alone. What the cut costs is measured, not assumed: ``slmops eval NEW --baseline SOURCE`` for
held-out perplexity and ``slmops bench SOURCE NEW`` for speed and memory; ``slmops distill`` heals it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from slmops.ops import children
from slmops.ops.back_to_gguf import gguf_weights
from slmops.store import manifests as mt
from slmops.store.manifests import Manifest
from slmops.store.store import Store
from slmops.types.errors import InvalidInput
from slmops.types.name import ModelName

Progress = Callable[[dict[str, Any]], None]


def calibration_text() -> str:
    """Prose of mixed registers written for slmops (``data/calibration.txt``), distinct from the held-out text
    perplexity is scored on, so a pruning choice is never tuned on what judges it."""
    return resources.files("slmops.ops").joinpath("data/calibration.txt").read_text()


@dataclass
class Importance:
    distances: list[float]  # per block, in block order
    tokens: int  # calibration tokens measured

    def lowest(self, n: int) -> list[int]:
        """The ``n`` blocks that change the hidden state least, in block order."""
        if not 0 < n < len(self.distances):
            raise InvalidInput(f"this model has {len(self.distances)} blocks; drop between 1 and "
                               f"{len(self.distances) - 1}")
        return sorted(sorted(range(len(self.distances)), key=self.distances.__getitem__)[:n])


def measure(gguf: Path, text: str, max_tokens: int = 512, progress: Progress | None = None) -> Importance:
    """Each block's angular distance on ``text`` (torch and transformers, in a child process)."""
    children.require(("torch", "transformers"), "measuring block importance", "convert")
    if max_tokens < 16:
        raise InvalidInput("calibrate on at least 16 tokens")
    with tempfile.TemporaryDirectory(prefix="slmops-importance-") as tmp:
        (Path(tmp) / "calibration.txt").write_text(text)
        out = children.run("slmops.ops.importance", [str(Path(gguf).absolute()), "calibration.txt", str(max_tokens)],
                           Path(tmp), "measuring block importance", progress)
    if not out or "distances" not in out:
        raise InvalidInput("measuring block importance gave no result")
    return Importance(out["distances"], out["tokens"])


@dataclass
class Shrunk:
    manifest: Manifest
    importance: Importance | None  # None when the blocks were named, not measured
    dropped: list[int]
    blocks_before: int


def shrink_model(store: Store, src: ModelName, dst: ModelName, drop: int = 0, blocks: list[int] | None = None,
                 text: str | None = None, max_tokens: int = 512, progress: Progress | None = None) -> Shrunk:
    """``dst``: ``src`` without ``blocks`` (given) or its ``drop`` least important ones (measured on ``text``, the
    shipped calibration text by default); template, system, parameters and licence kept."""
    if src == dst:
        raise InvalidInput(f"shrink writes a new model; give a name other than {src.display} with --to")
    if bool(drop) == bool(blocks):
        raise InvalidInput("say how much to drop: --drop N (measured) or --blocks I,J,... (named), not both")
    manifest, layer = gguf_weights(store, src, "shrink")
    info = store.inspect(src)
    n_blocks = int(info.metadata.get(f"{info.architecture}.block_count", 0))
    if n_blocks < 2:
        raise InvalidInput(f'"{src.display}" does not say how many transformer blocks it has')
    importance = None
    with store.blobs.plain(layer.blob, f"model of {src.display}") as path:
        if blocks:
            bad = [b for b in blocks if not 0 <= b < n_blocks]
            if bad or len(set(blocks)) >= n_blocks:
                raise InvalidInput(f"this model has blocks 0..{n_blocks - 1}; keep at least one")
            chosen = sorted(set(blocks))
        else:
            importance = measure(path, text or calibration_text(), max_tokens, progress)
            chosen = importance.lowest(drop)
        from slmops.engine.llamacpp.bindings import quantize_file  # llama.cpp loads only to cut
        from slmops.types import quant

        def produce(out: Path) -> None:
            quantize_file(path, out, quant.FTYPES["f16"], allow_requantize=False, prune=chosen, only_copy=True)

        with store.writing():
            new, new_info = store.import_derived(produce, dst.display)
            layers = [new if x.media_type == mt.MODEL else x for x in manifest.layers]
            config = store.config_layer(new_info, layers, {"pruned_from": src.display, "pruned_blocks": chosen})
            written = store.write_manifest(dst, layers, config)
    return Shrunk(written, importance, chosen, n_blocks)
