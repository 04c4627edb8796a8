"""Rated feedback (the JSONL that ``slmops feedback export`` and ``slmops fleet feedback export`` write) turned into a
fine-tuning dataset that says where every example came from.

    DIR/train.jsonl       {"messages": [...], "id": "fb_…", "release": "…"} a line: answers rated 1, to imitate
    DIR/heldout.jsonl     the same shape: answers rated 1 kept out of training, the gate's held-out set
    DIR/rejected.jsonl    answers rated -1, with the rater's comment and tags: kept for preference tuning and
                          review, never imitated
    DIR/provenance.json   the sources (sha256), the counts, the releases and devices the ratings came from, every
                          feedback id in each file, and the sha256 of each file; written last

A conversation is the same whatever its whitespace at either end, and is kept once: rated twice alike, its first
rating stays (the other ids are listed as duplicates); rated both ways, it is left out of every file (a
contradiction teaches nothing). Which conversations are held out depends only on their text (a hash), so a dataset
built again with more feedback keeps the same held-out examples and a gate compares like with like.

``provenance.json`` is written last and names the sha256 of every file: :func:`load` refuses a folder whose files
do not match it, so a dataset cut short by a crash, or edited after it was built, is never trained on.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from slmops.api.feedback import FeedbackLine
from slmops.store.atomic import atomic_writer
from slmops.types.errors import InvalidInput

FILES = ("train.jsonl", "heldout.jsonl", "rejected.jsonl")
PROVENANCE = "provenance.json"
_SCALE = 10_000


@dataclass
class Dataset:
    path: Path
    train: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    provenance: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.provenance["digest"]


def conversation_key(messages: list[dict[str, Any]]) -> str:
    """sha256 of the conversation's roles and texts, stripped: what makes two ratings the same example."""
    canon = json.dumps([[m["role"], m["content"].strip()] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def read_export(path: Path) -> list[FeedbackLine]:
    """Every line of an export, or a one-line error naming the first bad one."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInput(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    lines = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            lines.append(FeedbackLine.model_validate_json(line))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "line"
            raise InvalidInput(f"{path} line {n} is not a feedback line ({where}: {first['msg']}); write it with "
                               "`slmops feedback export` or `slmops fleet feedback export`") from None
    return lines


def build(sources: list[Path], out: Path, heldout_share: float = 0.2, release: str | None = None) -> Dataset:
    """Read ``sources``, keep ``release``'s ratings only if given, and write the dataset folder ``out``."""
    if not sources:
        raise InvalidInput("give at least one feedback export (JSONL)")
    if not 0 < heldout_share < 1:
        raise InvalidInput("--heldout is the share of good answers kept out of training: between 0 and 1")
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"{out} is a file; give a folder for the dataset")
    if out.is_dir() and any(out.iterdir()) and not (out / PROVENANCE).is_file():
        raise InvalidInput(f"{out} holds files that are not a dataset; give an empty or new folder")
    read = [(path, read_export(path)) for path in sources]
    lines = [line for _, ls in read for line in ls if release is None or line.release == release]
    if not lines:
        raise InvalidInput(f"no ratings{f' of {release}' if release else ''} in {', '.join(map(str, sources))}")
    by_key: dict[str, list[FeedbackLine]] = {}
    for line in sorted(lines, key=lambda x: (x.at, x.id)):
        by_key.setdefault(conversation_key([m.model_dump() for m in line.messages]), []).append(line)
    good, bad, duplicates, conflicts = [], [], [], []
    for key, rated in by_key.items():
        if len({x.rating for x in rated}) > 1:
            conflicts += [x.id for x in rated]
            continue
        duplicates += [x.id for x in rated[1:]]
        (good if rated[0].rating == 1 else bad).append((key, rated[0]))
    if len(good) < 2:
        raise InvalidInput(f"{len(good)} answer(s) rated 1 after removing duplicates and contradictions; a dataset "
                           "needs at least 2 (one to train on, one to hold out)")
    held = [(k, x) for k, x in good if int(k[:8], 16) % _SCALE < heldout_share * _SCALE]
    if not held or len(held) == len(good):  # too few to split by hash: hold out the lowest hash, train the rest
        held = [min(good, key=lambda kx: kx[0])]
    held_ids = {x.id for _, x in held}
    train = [x for _, x in good if x.id not in held_ids]
    rows = {"train.jsonl": [_example(x) for x in train],
            "heldout.jsonl": [_example(x) for _, x in held],
            "rejected.jsonl": [{**_example(x), "comment": x.comment, "tags": x.tags} for _, x in bad]}
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in FILES:
        data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows[name]).encode()
        with atomic_writer(out / name) as f:
            f.write(data)
        files[name] = hashlib.sha256(data).hexdigest()
    used = [x for x in lines if x.id not in set(conflicts)]
    provenance = {
        "digest": "sha256:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
        "created": time.time(),
        "sources": [{"file": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "lines": len(ls)}
                    for p, ls in read],
        "release_filter": release,
        "heldout_share": heldout_share,
        "counts": {"ratings": len(lines), "train": len(rows["train.jsonl"]), "heldout": len(held),
                   "rejected": len(bad), "duplicates": len(duplicates), "conflicting": len(conflicts)},
        "releases": dict(Counter(x.release for x in used)),
        "hardware_classes": dict(Counter(x.hardware_class for x in used if x.hardware_class)),
        "devices": len({x.device_id for x in used if x.device_id}),
        "ids": {"train": [x.id for x in train], "heldout": [x.id for _, x in held],
                "rejected": [x.id for _, x in bad], "duplicates": duplicates, "conflicting": conflicts},
        "files": files,
    }
    with atomic_writer(out / PROVENANCE) as f:
        f.write(json.dumps(provenance, indent=1, sort_keys=True).encode())
    return Dataset(out, rows["train.jsonl"], rows["heldout.jsonl"], provenance)


def _example(line: FeedbackLine) -> dict[str, Any]:
    return {"messages": [m.model_dump() for m in line.messages], "id": line.id, "release": line.release}


def load(path: Path) -> Dataset:
    """A dataset folder :func:`build` wrote, checked against its provenance."""
    try:
        provenance = json.loads((path / PROVENANCE).read_text())
        files = {name: (path / name).read_bytes() for name in FILES[:2]}
    except (OSError, ValueError):
        raise InvalidInput(f"{path} is not a dataset; build one with `slmops feedback dataset EXPORT.jsonl -o "
                           f"{path}`") from None
    for name, data in files.items():
        if hashlib.sha256(data).hexdigest() != provenance.get("files", {}).get(name):
            raise InvalidInput(f"{path / name} does not match its provenance.json (changed or cut short); build "
                               "the dataset again")
    train, heldout = ([json.loads(x) for x in files[n].decode().splitlines() if x.strip()] for n in FILES[:2])
    return Dataset(path, train, heldout, provenance)


def conversations(rows: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
    """The examples' messages, roles and texts only: what the template renders and the gate scores."""
    return [[{"role": m["role"], "content": m["content"]} for m in row["messages"]] for row in rows]


def summary(ds: Dataset) -> dict[str, Any]:
    """What a model's config and a release's notes carry of the dataset: counts, releases and every feedback id,
    never text (the prompts and answers stay where they were opted in)."""
    p = ds.provenance
    return {"digest": p["digest"], "counts": p["counts"], "releases": p["releases"],
            "hardware_classes": p["hardware_classes"], "devices": p["devices"],
            "ids": {k: p["ids"][k] for k in ("train", "heldout")}}
