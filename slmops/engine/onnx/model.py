"""An ONNX Runtime GenAI model folder, loaded on the first execution provider that takes it, served as a
:class:`slmops.engine.backend.BackendModel` with its own generate loop (:mod:`.generate`).

The folder (``genai_config.json``, the ONNX graph and its weights, the tokenizer files) comes from the store as
blobs linked into a temporary folder. It stays until the model closes: the runtime reads the tokenizer from it
again for every constrained request (llguidance), not only at load.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og

from slmops.engine.backend import BatchPlan
from slmops.engine.client import Cancel, Emit, EngineConfig, ModelSpec, ModelUnloaded
from slmops.engine.onnx import providers
from slmops.engine.onnx.generate import GenerateLoop, Vocab, one_line
from slmops.engine.streams import TokenStream
from slmops.store.sealed import plain_folder
from slmops.types import options as opts
from slmops.types.errors import EngineError, InvalidModelFile, Unsupported

DEFAULT_PARALLEL = 4  # requests generating at once when SLMOPS_NUM_PARALLEL leaves it open


class OnnxModel:
    """A loaded ONNX Runtime GenAI model. ``provider``: the execution provider it runs on; ``fallback``: why that
    is not the first one tried (None when it is), e.g. ``"cuda failed (...); on the CPU"``."""

    decoder = None  # no continuous batching: :meth:`start` runs the generate loop
    embedding_only = False

    def __init__(self, spec: ModelSpec, load: opts.LoadParams, config: EngineConfig):
        self.name = spec.name
        self._folder = contextlib.ExitStack()
        try:
            folder = self._folder.enter_context(plain_folder(spec.files, spec.unseal_key, spec.name)) \
                if spec.files else Path(spec.model_path)
            self._read_configs(folder)
            n_ctx = min(load.num_ctx, self.n_ctx_train) if self.n_ctx_train else load.num_ctx
            tried = providers.order(config.onnx_providers or None, allow_gpu=load.num_gpu != 0)
            self.model, self.provider, self.fallback = _place(folder, tried, _overlay(n_ctx, load.num_thread),
                                                              spec.name)
            self.tokenizer = og.Tokenizer(self.model)
        except BaseException:
            self._folder.close()
            raise
        n_parallel = config.num_parallel if config.num_parallel > 0 else DEFAULT_PARALLEL
        self.plan = BatchPlan(n_parallel)
        self.loop = GenerateLoop(self.model, self.tokenizer, Vocab(self.n_vocab, self.eos, self.special), n_parallel,
                                 config.max_queue, n_ctx)
        self._closed = False

    def _read_configs(self, folder: Path) -> None:
        genai = _json(folder / "genai_config.json", required=True)
        tok = _json(folder / "tokenizer_config.json")
        model = genai.get("model") or {}
        self.n_ctx_train = int(model.get("context_length") or 0)
        self.n_vocab = int(model.get("vocab_size") or 0) or _vocab_size(folder)
        eos = model.get("eos_token_id")
        self.eos = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.bos_text, self.eos_text = _token_text(tok.get("bos_token")), _token_text(tok.get("eos_token"))
        self.add_bos = bool(tok.get("add_bos_token", False))
        self.bos_id = model.get("bos_token_id")
        added = tok.get("added_tokens_decoder") or {}
        self.special = frozenset(int(i) for i, t in added.items() if isinstance(t, dict) and t.get("special")) \
            | self.eos

    # -- tokens --------------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """The runtime's tokenizer always reads special tokens in ``text``, whatever ``parse_special`` says."""
        tokens = self.tokenizer.encode(text).tolist()
        if add_special and self.add_bos and isinstance(self.bos_id, int) and tokens[:1] != [self.bos_id]:
            tokens.insert(0, self.bos_id)
        return tokens

    def detokenize(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(np.asarray(tokens, dtype=np.int32)) if tokens else ""

    # -- generation ----------------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Requests queued for a turn (``/api/ps``, metrics)."""
        return self.loop.waiting

    def start(self, tokens: list[int], sampling: opts.SamplingParams, constraint: Any, emit: Emit,
              load_duration: int, n_ctx: int | None, whole: bool = False) -> Cancel:
        """``constraint``: the ``(guidance type, data)`` pair :meth:`OnnxBackend.compile` made, or None."""
        if self._closed:
            raise ModelUnloaded(self.name)
        return self.loop.submit(TokenStream(list(tokens), sampling, emit, load_duration, whole), constraint, n_ctx)

    def embed(self, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
        raise Unsupported("embeddings", "ONNX Runtime GenAI")

    def close(self) -> None:
        """Finish what runs and waits, refusing new requests; then free the runtime's memory and the folder."""
        if self._closed:
            return
        self._closed = True
        self.loop.close(ModelUnloaded(self.name))
        self.loop.model = self.loop.tokenizer = None
        self.tokenizer = self.model = None
        self._folder.close()


def _place(folder: Path, tried: tuple[providers.Provider, ...], overlay: str,
           name: str) -> tuple[Any, str, str | None]:
    """(model, provider, fallback) from the first provider that loads the model. A provider the build or the
    machine lacks fails as a plain ``RuntimeError`` from ``og.Model``: remembered, and the next one tried."""
    failed: list[str] = []
    for p in tried:
        try:
            cfg = og.Config(str(folder))
            cfg.clear_providers()
            if p.genai:
                cfg.append_provider(p.genai)
            cfg.overlay(overlay)
            model = og.Model(cfg)
        except RuntimeError as err:
            failed.append(f"{p.name} failed ({one_line(err, 160)})")
            continue
        where = "the CPU" if p.genai is None else p.name
        return model, p.name, "; ".join([*failed, f"on {where}"]) if failed else None
    raise EngineError(f'ONNX Runtime GenAI could not load "{name}": ' + "; ".join(failed))


def _overlay(max_length: int, threads: int) -> str:
    """Settings over the folder's ``genai_config.json``: ``max_length`` sizes each request's KV memory (the folder
    says the whole training context, 8192 tokens for the default model, which a small context never uses)."""
    overlay: dict[str, Any] = {"search": {"max_length": max_length}}
    if threads > 0:
        overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": threads}}}
    return json.dumps(overlay)


def _json(path: Path, required: bool = False) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        if required:
            raise InvalidModelFile(f"not an ONNX Runtime GenAI model: {path.name} is missing") from None
        return {}
    except (OSError, ValueError) as err:
        raise InvalidModelFile(f"{path.name} of the ONNX model cannot be read: {err}") from None
    return data if isinstance(data, dict) else {}


def _token_text(token: Any) -> str:
    """A tokenizer_config token: a string, or an object with its ``content``."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


def _vocab_size(folder: Path) -> int:
    """For a genai_config without ``vocab_size``: the tokenizer's vocabulary and added tokens."""
    tok = _json(folder / "tokenizer.json")
    ids = list(((tok.get("model") or {}).get("vocab") or {}).values())
    ids += [t.get("id") for t in tok.get("added_tokens") or [] if isinstance(t, dict)]
    return max((i for i in ids if isinstance(i, int)), default=-1) + 1
