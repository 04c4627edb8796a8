"""What encryption at rest costs at load time: the same model loaded from a plain store and from a sealed one
(``SLMOPS_STORE_KEY``), alternately, in this process. Prints medians and the ratio sealed/plain.

    python bench/sealed_load.py --rounds 7        # uses SLMOPS_HOME (default ~/.slmops) with smollm2:135m

Two loads are timed:
- *load*: what every load of a model pays once its files were checked before: ``Engine.load`` (for a sealed
  model, decrypting the weights into memory, then llama.cpp mapping them and building its context);
- *first load*: what the first load after a blob was written pays: checking every blob against its digest,
  reading GGUF metadata, then the load.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from slmops.engine.client import EngineConfig, spec_from_store
from slmops.engine.engine import Engine
from slmops.local import open_store
from slmops.store.store import Store
from slmops.types.name import ModelName

HERE = Path(__file__).resolve().parent


def copy_store(src: Store, dst: Path, key: bytes | None) -> Store:
    """Blobs hard-linked; sealing then writes new files, so the source is never touched."""
    shutil.copytree(src.root / "manifests", dst / "manifests")
    (dst / "blobs").mkdir(parents=True)
    for blob in (src.root / "blobs").iterdir():
        if blob.name.startswith("sha256-"):
            os.link(blob, dst / "blobs" / blob.name)
    store = Store(dst, key=key)
    store.reseal(key is not None)
    return store


def timed_load(store: Store, name: ModelName, first: bool) -> float:
    if first:  # forget what was checked, as after a pull or a changed file
        shutil.rmtree(store.root / "cache", ignore_errors=True)
    t0 = time.perf_counter()
    spec = spec_from_store(store, name)
    engine = Engine(EngineConfig(default_ctx=2048, num_parallel=1))
    try:
        engine.load(spec)
        return time.perf_counter() - t0
    finally:
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model", default="smollm2:135m")
    ap.add_argument("--json", type=Path, default=HERE / "out" / "sealed_load.json")
    args = ap.parse_args()

    name = ModelName.parse(args.model)
    source = open_store()
    with tempfile.TemporaryDirectory(prefix="sealed-bench-") as tmp:
        stores = {"plain": copy_store(source, Path(tmp) / "plain", None)}
        t0 = time.perf_counter()
        stores["sealed"] = copy_store(source, Path(tmp) / "sealed", secrets.token_bytes(32))
        seal_s = time.perf_counter() - t0
        size = sum(l.size for l in source.manifest(name).all_layers())
        for s in stores.values():
            timed_load(s, name, first=True)  # warm the page cache and llama.cpp's first-use work
        results: dict[str, dict[str, list[float]]] = {k: {"load": [], "first_load": []} for k in stores}
        for r in range(args.rounds):
            for kind in ("load", "first_load"):
                for label, s in stores.items():
                    results[label][kind].append(timed_load(s, name, first=kind == "first_load"))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    summary = {}
    print(f"{'':>11} {'plain s':>9} {'sealed s':>9} {'ratio':>7}")
    for kind in ("load", "first_load"):
        a, b = (statistics.median(results[k][kind]) for k in ("plain", "sealed"))
        summary[kind] = {"plain_s": a, "sealed_s": b, "ratio": b / a, "added_s": b - a}
        print(f"{kind:>11} {a:>9.3f} {b:>9.3f} {b / a:>6.2f}x")
    print(f"sealing the store: {size / 1e6:.0f} MB in {seal_s:.2f} s ({size / 1e6 / seal_s:.0f} MB/s)")
    args.json.parent.mkdir(exist_ok=True)
    args.json.write_text(json.dumps({"rounds": args.rounds, "model": args.model, "model_bytes": size,
                                     "seal_seconds": seal_s, "summary": summary, "raw": results}, indent=2))


if __name__ == "__main__":
    main()
