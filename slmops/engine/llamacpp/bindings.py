"""llama.cpp's C API through ``llama_cpp`` ctypes: model, context, batch, memory, C sampler chains and quantize.

Everything per-token that llama.cpp can do in C stays in C (the sampler chain samples and accepts in one call);
prompt chunks go into the batch through numpy views of its ctypes arrays instead of Python loops over the prompt,
and what runs once per generated token is written for the cold caches a decode leaves (see ``decode_items``).
"""

from __future__ import annotations

import ctypes
import re
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np

from slmops.types.errors import EngineError, InvalidInput, OutOfMemory
from slmops.types.options import LoadParams, SamplingParams

_init_lock = threading.Lock()
_initialized = False
_verbose = False
_listener: Callable[[str], None] | None = None  # sees llama.cpp's log while a quantize runs (its progress)
_quantize_lock = threading.Lock()  # one listener at a time
_KV_TYPES = {"f16": lc.GGML_TYPE_F16, "q8_0": lc.GGML_TYPE_Q8_0}
_TENSOR_DONE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
# The address alone: llama_cpp's own wrapper returns a ctypes pointer, and a numpy view of that is rebuilt per call
_logits_at = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(
    ("llama_get_logits_ith", lc.llama_cpp._lib))


@lc.llama_log_callback
def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    """llama.cpp's own log reaches stderr only with SLMOPS_DEBUG: it logs benign conditions at error level
    (BERT vocabularies, for one), and every failure that matters surfaces as an slmops error anyway."""
    line = text.decode("utf-8", "replace")
    if _listener is not None:
        _listener(line)
    if _verbose:
        sys.stderr.write(line)


def init_backend(verbose: bool | None = None) -> None:
    """Once per process; llama.cpp logs only when asked, so the CLI stays quiet. ``None`` keeps the setting."""
    global _initialized, _verbose
    if verbose is not None:
        _verbose = verbose
    with _init_lock:
        if not _initialized:
            lc.llama_log_set(_log, ctypes.c_void_p(0))
            lc.llama_backend_init()
            _initialized = True


class LlamaModel:
    def __init__(self, path: Path, n_gpu_layers: int = 0):
        init_backend()
        params = lc.llama_model_default_params()
        params.use_mmap = True
        params.n_gpu_layers = n_gpu_layers
        self.ptr = lc.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise EngineError("llama.cpp could not load the model file; it may be corrupt or of an unsupported architecture")
        self.vocab = lc.llama_model_get_vocab(self.ptr)
        self.n_vocab = lc.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lc.llama_model_n_ctx_train(self.ptr)
        self.n_embd = lc.llama_model_n_embd(self.ptr)
        self.bos = lc.llama_vocab_bos(self.vocab)
        self.eos = lc.llama_vocab_eos(self.vocab)
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self.vocab)) and self.bos >= 0
        self._pieces: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})  # without, with special tokens' text
        self._eog: dict[int, bool] = {}
        self._adapters: list[LoraAdapter] = []

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (lc.llama_token * cap)()
        n = lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (lc.llama_token * cap)()
            n = lc.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise EngineError("tokenization failed")
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """A token's bytes, remembered: the vocabulary is fixed, and on the runner's per-token path a dict lookup
        costs a fraction of the call into llama.cpp. A first sight fills a buffer of its own (threads share none)."""
        memo = self._pieces[special]
        out = memo.get(token)
        if out is None:
            buf = ctypes.create_string_buffer(256)
            n = lc.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
            out = memo[token] = buf.raw[:n]
        return out

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.piece(t, special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(lc.llama_vocab_is_eog(self.vocab, token))
        return eog

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab

    def load_lora(self, path: Path) -> "LoraAdapter":
        ptr = lc.llama_adapter_lora_init(self.ptr, str(path).encode())
        if not ptr:
            raise InvalidInput("the ADAPTER is not a LoRA adapter for this model (architecture or shapes differ)")
        adapter = LoraAdapter(ptr)
        self._adapters.append(adapter)
        return adapter

    def close(self) -> None:
        if self.ptr:
            for a in self._adapters:
                lc.llama_adapter_lora_free(a.ptr)
            self._adapters.clear()
            lc.llama_model_free(self.ptr)
            self.ptr = None


class LoraAdapter:
    def __init__(self, ptr):
        self.ptr = ptr


class LlamaContext:
    """One llama.cpp context; ``n_seq_max`` sequences share its unified KV cache."""

    def __init__(self, model: LlamaModel, params: LoadParams, n_seq_max: int = 1, embeddings: bool = False,
                 pooling: int | None = None):
        """``pooling``: the model's own (``None`` for models that declare none, which are mean-pooled)."""
        cp = lc.llama_context_default_params()
        cp.n_ctx = params.num_ctx
        cp.n_batch = params.num_batch
        cp.n_ubatch = params.num_batch
        if embeddings:
            cp.pooling_type = lc.LLAMA_POOLING_TYPE_MEAN if pooling is None else lc.LLAMA_POOLING_TYPE_UNSPECIFIED
        cp.n_seq_max = n_seq_max
        cp.n_threads = params.threads
        cp.n_threads_batch = params.threads
        cp.embeddings = embeddings
        cp.no_perf = True
        # Sequences share one cell pool, so a prefix copy between them shares cells. A stream per sequence
        # (kv_unified False) spares each token the masked attention over other sequences' cells (a step of eight
        # distinct 700-token streams: 47 ms against 56-63), but llama.cpp then splits a batch into one pass per
        # run length, so a step mixing decodes with a prompt chunk costs two or more passes: measured in
        # bench/serve_bench.py, S2 fell from 1.14x to 0.95x of llama-server and S3 did not move.
        cp.kv_unified = True
        if params.kv_type not in _KV_TYPES:
            raise InvalidInput(f"KV cache type {params.kv_type!r} is not one of {', '.join(_KV_TYPES)}")
        cp.type_k = cp.type_v = _KV_TYPES[params.kv_type]  # a quantized V cache needs flash attention: auto
        self.model = model
        self.params = params
        self.ptr = lc.llama_init_from_model(model.ptr, cp)
        if not self.ptr:
            raise OutOfMemory(f"llama.cpp could not create a context of {params.num_ctx} tokens (its KV cache did "
                              "not fit in memory); lower num_ctx")
        self.n_ctx = lc.llama_n_ctx(self.ptr)
        self.n_batch = params.num_batch
        self.mem = lc.llama_get_memory(self.ptr)
        self._batch = lc.llama_batch_init(self.n_batch, 0, n_seq_max)
        self._tokens = np.ctypeslib.as_array(self._batch.token, shape=(self.n_batch,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._n_seq = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.n_batch,))
        self._logits = np.ctypeslib.as_array(self._batch.logits, shape=(self.n_batch,))
        self._n_seq[:] = 1
        # Point every token's seq_id at a row of one contiguous array, so a whole batch's sequence ids are one
        # numpy write (column 0; the other columns list the sequences that share a token, see decode_items); the
        # pointers llama_batch_init allocated are kept and restored before llama_batch_free.
        self._seqs = np.zeros((self.n_batch, n_seq_max), dtype=np.int32)
        self._seq = self._seqs[:, 0]
        self._shared: list[slice] = []  # tokens of the last decode listed in more than one sequence
        self._own_seq_ptrs = [ctypes.cast(self._batch.seq_id[i], ctypes.c_void_p).value for i in range(self.n_batch)]
        base, row = self._seqs.ctypes.data, self._seqs.strides[0]
        for i in range(self.n_batch):
            self._batch.seq_id[i] = ctypes.cast(base + row * i, ctypes.POINTER(lc.llama_seq_id))
        # A one-token item is written through these ctypes pointers, a prompt chunk through the numpy views
        self._c = (self._batch.token, self._batch.pos,
                   (ctypes.c_int32 * self._seqs.size).from_buffer(self._seqs), self._batch.logits, n_seq_max)
        self._addr = ctypes.cast(self.ptr, ctypes.c_void_p).value
        self._views: dict[int, np.ndarray] = {}  # logits address -> a numpy view of it

    def set_loras(self, adapters: list[LoraAdapter], scale: float = 1.0) -> None:
        arr = (lc.llama_adapter_lora_p_ctypes * len(adapters))(*[a.ptr for a in adapters])
        scales = (ctypes.c_float * len(adapters))(*([scale] * len(adapters)))
        if lc.llama_set_adapters_lora(self.ptr, arr, len(adapters), scales) != 0:
            raise EngineError("llama.cpp could not apply the LoRA adapters")

    def decode_batch(self, tokens: np.ndarray, pos: np.ndarray, seqs: np.ndarray, want: np.ndarray) -> None:
        """One ``llama_decode`` over tokens of several sequences (at most ``n_batch``)."""
        n = len(tokens)
        self._one_seq_each()
        self._tokens[:n] = tokens
        self._pos[:n] = pos
        self._seq[:n] = seqs
        self._logits[:n] = want
        self._decode(n)

    def decode_items(self, items: Sequence[Any]) -> None:
        """One ``llama_decode`` over the scheduler's items (``slot``, ``tokens``, ``pos0``, ``sample``).

        The code between two decodes runs on cold caches (a step streams the whole model through them): there, each
        numpy call costs tens of microseconds where a ctypes store costs a few, so a decoding sequence's one token
        is written with four stores and only prompt chunks go through numpy.
        """
        tok, pos, seq, want, row = self._c
        self._one_seq_each()
        k = 0
        for it in items:
            n = len(it.tokens)
            if n == 1 and not it.also:
                tok[k], pos[k], seq[row * k], want[k] = it.tokens[0], it.pos0, it.slot, it.sample
            else:
                self._tokens[k:k + n] = it.tokens
                self._pos[k:k + n] = np.arange(it.pos0, it.pos0 + n, dtype=np.int32)
                self._seq[k:k + n] = it.slot
                self._logits[k:k + n] = 0
                want[k + n - 1] = it.sample
                if it.also:  # one cell per token, held by every sequence riding along with this prefill
                    self._seqs[k:k + n, 1:1 + len(it.also)] = it.also
                    self._n_seq[k:k + n] = 1 + len(it.also)
                    self._shared.append(slice(k, k + n))
            k += n
        self._decode(k)

    def _one_seq_each(self) -> None:
        for done in self._shared:
            self._n_seq[done] = 1
        self._shared.clear()

    def _decode(self, n: int) -> None:
        self._batch.n_tokens = n
        rc = lc.llama_decode(self.ptr, self._batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc} (the KV cache may be full; lower num_ctx or "
                              "SLMOPS_NUM_PARALLEL)")

    def seq_copy(self, src: int, dst: int, n: int) -> None:
        lc.llama_memory_seq_cp(self.mem, src, dst, 0, n)

    def seq_drop(self, seq: int) -> None:
        lc.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def seq_trim(self, seq: int, n: int) -> None:
        """Keep only the first ``n`` positions of ``seq``."""
        lc.llama_memory_seq_rm(self.mem, seq, n, -1)

    def seq_save(self, seq: int) -> ctypes.Array:
        """A copy of ``seq``'s KV cells in host memory, for :meth:`seq_restore`."""
        size = lc.llama_state_seq_get_size(self.ptr, seq)
        buf = (ctypes.c_uint8 * size)()
        if lc.llama_state_seq_get_data(self.ptr, buf, size, seq) != size:
            raise EngineError("llama.cpp could not copy a sequence's KV cache to host memory")
        return buf

    def seq_restore(self, buf: ctypes.Array, seq: int) -> bool:
        """Load a saved sequence into ``seq`` (emptied first); False when the KV cache has no contiguous room."""
        return lc.llama_state_seq_set_data(self.ptr, buf, len(buf), seq) == len(buf)

    def all_logits(self, n: int) -> np.ndarray:
        """Logits of the last decode's ``n`` outputs, one row each (every token asked for them)."""
        return np.ctypeslib.as_array(lc.llama_get_logits(self.ptr), shape=(n, self.model.n_vocab))

    def logits(self, idx: int) -> np.ndarray:
        """The raw logits at batch index ``idx`` as a numpy view (valid until the next decode).

        Views are kept by address: llama.cpp writes a step's logits to the same rows of its output buffer, and
        building a view costs 70 us on the cold caches after a decode (np.ctypeslib makes a ctypes type each time),
        a lookup a third of that."""
        addr = _logits_at(self._addr, idx)
        view = self._views.get(addr)
        if view is None:
            if not addr:
                raise EngineError(f"llama.cpp has no logits at batch index {idx}")
            if len(self._views) >= 4096:  # the buffer moved (a bigger batch asked for more rows): drop the old rows
                self._views.clear()
            view = self._views[addr] = np.frombuffer((ctypes.c_float * self.model.n_vocab).from_address(addr),
                                                     dtype=np.float32)
        return view

    def embed(self, tokens: list[int]) -> np.ndarray:
        """Pooled embedding of ``tokens`` (an embeddings context, one sequence, memory cleared first)."""
        if len(tokens) > self.n_batch:
            raise InvalidInput(f"input is {len(tokens)} tokens but the embedding context holds {self.n_batch}")
        self.clear()
        n = len(tokens)
        self._tokens[:n] = tokens
        self._pos[:n] = np.arange(n, dtype=np.int32)
        self._logits[:n] = 1
        self._batch.n_tokens = n
        rc = lc.llama_decode(self.ptr, self._batch)
        if rc != 0:
            raise EngineError(f"llama_decode failed with code {rc}")
        ptr = lc.llama_get_embeddings_seq(self.ptr, 0)
        if not ptr:
            raise EngineError("this model produced no pooled embedding")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).copy()

    def clear(self) -> None:
        lc.llama_memory_clear(self.mem, True)

    def close(self) -> None:
        if self.ptr:
            for i, addr in enumerate(self._own_seq_ptrs):
                self._batch.seq_id[i] = ctypes.cast(addr, ctypes.POINTER(lc.llama_seq_id))
            lc.llama_batch_free(self._batch)
            lc.llama_free(self.ptr)
            self.ptr = None


class SamplerChain:
    """A C sampler chain in Ollama's order: penalties → grammar → top_k → typical → top_p → min_p → temperature → dist.

    Penalties are applied here, to the logits of the tokens in the penalty window only, not by llama.cpp's
    penalties sampler: that one looks up every vocabulary entry in a hash map at every token (49,152 lookups for
    SmolLM2, about 0.5 ms, 5 % of a decode step), where the window holds 64 tokens. The arithmetic is the same
    (``penalties_apply`` in llama-sampler.cpp), and the window's logits are put back after sampling, so
    log-probabilities are reported from the model's own logits, as before.

    Greedy sampling without a grammar is an argmax over the logits here: ``llama_sampler_sample`` first copies the
    whole vocabulary into a candidate array (49,152 entries of 12 bytes for SmolLM2), ~0.3 ms a token, 4 % of a
    single-stream decode step, for a pick numpy makes in ~20 µs. The same token: both take the first highest logit.
    """

    def __init__(self, model: LlamaModel, p: SamplingParams, n_ctx: int, prompt: list[int],
                 grammar: str | None = None):
        """``grammar``: GBNF every sampled token must follow, already checked (:func:`.grammar.to_gbnf`)."""
        self.ptr = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        last_n = n_ctx if p.repeat_last_n == -1 else p.repeat_last_n
        active = last_n > 0 and (p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0)
        self._window: deque[int] | None = deque(prompt[-last_n:], maxlen=last_n) if active else None
        self._counts = Counter(self._window or ())  # the window's tokens, kept as it slides: no sort per token
        self._repeat, self._freq, self._present = p.repeat_penalty, p.frequency_penalty, p.presence_penalty
        self._greedy = p.temperature <= 0 and not grammar
        # The argmax of the unpenalized logits is the answer whenever it is not in the window (a third of the
        # numpy calls, which cost tens of microseconds each on the cold caches after a decode)
        self._lowers_only = self._greedy and self._repeat >= 1.0 and self._freq >= 0.0 and self._present >= 0.0
        add = lambda s: lc.llama_sampler_chain_add(self.ptr, s)  # noqa: E731
        if grammar:
            compiled = lc.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
            if not compiled:
                self.close()
                raise InvalidInput("the output format could not be compiled to a grammar; simplify the JSON schema")
            add(compiled)
        if p.temperature <= 0:
            add(lc.llama_sampler_init_greedy())
            return
        add(lc.llama_sampler_init_top_k(p.top_k))
        add(lc.llama_sampler_init_typical(p.typical_p, 1))
        add(lc.llama_sampler_init_top_p(p.top_p, 1))
        add(lc.llama_sampler_init_min_p(p.min_p, 1))
        add(lc.llama_sampler_init_temp(p.temperature))
        add(lc.llama_sampler_init_dist(p.seed & 0xFFFFFFFF if p.seed >= 0 else lc.LLAMA_DEFAULT_SEED))

    def sample(self, ctx: LlamaContext, idx: int) -> int:
        if self._window is None:
            return int(ctx.logits(idx).argmax()) if self._greedy else lc.llama_sampler_sample(self.ptr, ctx.ptr, idx)
        logits = ctx.logits(idx)
        if self._lowers_only:  # greedy: penalties only lower the window's logits, so a top token outside it wins
            tok = int(logits.argmax())
            if tok not in self._counts:
                self._slide(tok)
                return tok
        n = len(self._counts)
        ids = np.fromiter(self._counts.keys(), dtype=np.intp, count=n)
        counts = np.fromiter(self._counts.values(), dtype=np.float32, count=n)
        own = logits[ids]
        logits[ids] = np.where(own <= 0, own * self._repeat, own / self._repeat) \
            - counts * self._freq - self._present
        try:
            tok = int(logits.argmax()) if self._greedy else lc.llama_sampler_sample(self.ptr, ctx.ptr, idx)
        finally:
            logits[ids] = own
        self._slide(tok)
        return tok

    def _slide(self, tok: int) -> None:
        if len(self._window) == self._window.maxlen:
            gone = self._window[0]
            self._counts[gone] -= 1
            if not self._counts[gone]:
                del self._counts[gone]
        self._window.append(tok)
        self._counts[tok] += 1

    def close(self) -> None:
        if self.ptr:
            lc.llama_sampler_free(self.ptr)
            self.ptr = None


def quantize_file(src: Path, dst: Path, ftype: int, allow_requantize: bool,
                  progress: Callable[[int, int], None] | None = None, threads: int = 0,
                  prune: Sequence[int] = (), only_copy: bool = False) -> None:
    """llama.cpp's quantizer from ``src`` to ``dst``; ``progress(done, total)`` per tensor, read from the log
    lines it writes for each (it has no progress callback). One quantize at a time per process.

    ``prune``: transformer blocks to leave out (the rest are renumbered and the block count rewritten);
    ``only_copy``: keep every tensor's type and bytes, so pruning alone changes nothing else."""
    global _listener
    init_backend()
    params = lc.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    params.only_copy = only_copy
    blocks = sorted(set(prune))  # llama.cpp walks the list in order, to the -1 that ends it
    keep_alive = (ctypes.c_int32 * (len(blocks) + 1))(*blocks, -1)
    if blocks:
        params.prune_layers = ctypes.cast(keep_alive, ctypes.POINTER(ctypes.c_int32))

    def listen(line: str) -> None:
        m = _TENSOR_DONE.search(line)
        if m and progress is not None:
            progress(int(m.group(1)), int(m.group(2)))

    with _quantize_lock:
        _listener = listen
        try:
            rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:
            _listener = None
    if rc != 0:
        raise EngineError("llama.cpp could not quantize this model (an unsupported tensor type or layout); "
                          "try another type, or SLMOPS_DEBUG=1 for its log")
