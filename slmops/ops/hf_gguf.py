"""A GGUF's weights and tokenizer through transformers (dequantized to float32), for the steps that need PyTorch:
training, block importance, the ONNX export. Runs in their child processes (:mod:`slmops.ops.children`).

transformers repeats work here that costs more than the load itself. Each ``from_pretrained(..., gguf_file=...)``
parses the whole file again with gguf's reader, the tokenizer's 49,152 strings and merges included (~4 s each
for SmolLM2 on 2 cores), and a tokenizer plus a model parse it four times. Mapping tensor names builds gguf's name
table once per tensor instead of once per model (~6 s). So, for the life of the child process, a file is parsed
once and the table built once per architecture and depth: 25 s -> ~9 s to load a model and its tokenizer.
Both are read-only (a memory map and a lookup table), which is what makes sharing them safe.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

_readers: dict[tuple[str, str], Any] = {}


def _share_parsing() -> None:
    import gguf

    if getattr(gguf.get_tensor_name_map, "cache_info", None) is not None:
        return  # already shared in this process
    parse = gguf.GGUFReader

    def reader(path: os.PathLike | str, mode: str = "r") -> Any:
        key = (os.path.realpath(path), mode)
        if key not in _readers:
            _readers[key] = parse(path, mode)
        return _readers[key]

    # transformers imports both inside its functions (``from gguf import ...``), so it finds these at each call
    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)


def model(gguf_path: Path):  # type: ignore[no-untyped-def]
    """The model in float32, as a transformers causal LM."""
    import torch
    from transformers import AutoModelForCausalLM

    _share_parsing()
    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)


def tokenizer(gguf_path: Path):  # type: ignore[no-untyped-def]
    """Its tokenizer, as transformers rebuilds it from the GGUF's vocabulary."""
    from transformers import AutoTokenizer

    _share_parsing()
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
