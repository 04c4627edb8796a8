"""Pull throughput from a registry on loopback, as a ratio to curl downloading the same blob in the same run.

A real ``docker-registry`` (Debian's Distribution 2.8, as the tests use) serves the default model; rounds
alternate between curl fetching the model blob to a file and ``Store.pull`` into an empty store (manifest,
config and model blob: streamed, hashed as written, renamed into place, the GGUF header validated, the
manifest written). All write to the same file system. Prints medians and the ratio slmops/curl of throughput
(bytes of the model blob per second); goal >= 0.8. A second peer does what a pull must also do — curl, then
``sha256sum`` and ``sync`` of the file — to show how much of the gap is the hash and the flush. The CPU time each
side spends (curl's process; this process during the pull, all its threads) is printed too: on a machine with
few cores, or one busy with other work, the ratio follows it.

    python bench/pull_bench.py --rounds 5 [--json out.json]     # uses SLMOPS_HOME (default ~/.slmops)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the registry the tests start, reused as is

from registry import Registry, upload_store_model  # noqa: E402

from slmops.local import open_store  # noqa: E402
from slmops.store.registry_auth import RegistryConfig  # noqa: E402
from slmops.store.store import Store  # noqa: E402
from slmops.types.name import ModelName, Reference  # noqa: E402

MODEL = ModelName.parse("smollm2:135m")


def cpu_s(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def curl_once(url: str, out: Path, verify: bool = False) -> tuple[float, float]:
    """Seconds, and CPU seconds of the processes run."""
    c0, t0 = cpu_s(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(["curl", "-sf", "-o", str(out), url], check=True)
    if verify:  # what a pull must also do: hash the bytes and make them durable
        subprocess.run(["sha256sum", str(out)], check=True, capture_output=True)
        subprocess.run(["sync", str(out)], check=True)
    elapsed, cpu = time.perf_counter() - t0, cpu_s(resource.RUSAGE_CHILDREN) - c0
    out.unlink()
    return elapsed, cpu


def pull_once(ref: Reference, root: Path) -> tuple[float, float]:
    """Seconds, and CPU seconds of this process, of the pull alone (the store's construction and removal are not
    timed)."""
    store = Store(root, allow_internal_registries=True)
    c0, t0 = cpu_s(resource.RUSAGE_SELF), time.perf_counter()
    store.pull(ref, registry=RegistryConfig(insecure=True))
    elapsed, cpu = time.perf_counter() - t0, cpu_s(resource.RUSAGE_SELF) - c0
    shutil.rmtree(root)
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    source = open_store()
    if not source.exists(MODEL):
        source.pull(MODEL)
    manifest = source.manifest(MODEL)
    blob = manifest.layer("application/vnd.ollama.image.model")
    with tempfile.TemporaryDirectory(prefix="pull-bench-") as tmp, Registry(Path(tmp) / "registry") as reg:
        upload_store_model(reg.url, "library/smol", "latest", source.root, MODEL.path_parts)
        ref = Reference.parse(f"{reg.host}/library/smol:latest")
        url = f"{reg.url}/v2/library/smol/blobs/{blob.digest}"
        curl_s, checked_s, pull_s, curl_cpu, pull_cpu = [], [], [], [], []
        for i in range(args.rounds):
            elapsed, cpu = curl_once(url, Path(tmp) / "blob")
            curl_s.append(elapsed)
            curl_cpu.append(cpu)
            checked_s.append(curl_once(url, Path(tmp) / "blob", verify=True)[0])
            elapsed, cpu = pull_once(ref, Path(tmp) / f"store{i}")
            pull_s.append(elapsed)
            pull_cpu.append(cpu)
    mb = blob.size / 1e6
    curl_med, checked_med, pull_med = (statistics.median(x) for x in (curl_s, checked_s, pull_s))
    result = {"blob_mb": round(mb, 1), "rounds": args.rounds, "curl_s": curl_s, "curl_sha256sum_sync_s": checked_s,
              "pull_s": pull_s, "curl_mb_s": round(mb / curl_med, 1), "pull_mb_s": round(mb / pull_med, 1),
              "ratio": round(curl_med / pull_med, 3), "ratio_to_checked": round(checked_med / pull_med, 3),
              "curl_cpu_s": curl_cpu, "pull_cpu_s": pull_cpu}
    print(f"model blob {mb:.1f} MB, {args.rounds} rounds alternating")
    print(f"curl        median {curl_med:.3f} s  {mb / curl_med:8.1f} MB/s")
    print(f"curl+sha256sum+sync median {checked_med:.3f} s  {mb / checked_med:8.1f} MB/s")
    print(f"slmops pull median {pull_med:.3f} s  {mb / pull_med:8.1f} MB/s")
    print(f"ratio (slmops/curl throughput): {curl_med / pull_med:.2f}x  (goal >= 0.8x)")
    print(f"ratio (slmops/curl+sha256sum+sync): {checked_med / pull_med:.2f}x")
    print(f"CPU per fetch, median: curl {statistics.median(curl_cpu):.3f} s, "
          f"slmops pull {statistics.median(pull_cpu):.3f} s (all its threads)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
