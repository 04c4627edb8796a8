"""Turn a GGUF into an ONNX Runtime GenAI model folder, offline, for the ``cpu-onnx-*`` variants.

The ORT GenAI model builder reads only float16/float32 GGUF, so the route goes through Hugging Face: transformers
dequantizes the GGUF into a safetensors folder, and the builder turns that folder into ONNX. Both steps need
the ``convert`` and ``onnx`` extras and run in child processes (``python -m slmops.ops.onnx_export``), so the
caller never imports torch or transformers, never sees the builder's stand-ins patched into transformers, and
gets none of the builder's output on its terminal. The folder appears at its destination complete or not at all.

Re-quantizing an already 4-bit model with the builder's default round-to-nearest int4 makes SmolLM2-135M loop
instead of answering; ``algo_config=k_quant`` keeps its answers, so int4 means k_quant here.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from slmops.ops import children
from slmops.types.errors import InvalidInput

PRECISIONS = {
    "int4": ["-p", "int4", "--extra_options", "algo_config=k_quant"],
    "int8": ["-p", "int8"],
    "fp32": ["-p", "fp32"],
}
NEEDS = ("torch", "transformers", "accelerate", "onnx_ir", "onnxruntime_genai")


def export(gguf: Path, out: Path, precision: str = "int4", status: Callable[[str], None] = lambda s: None,
           python: str = sys.executable) -> None:
    """Write the ORT GenAI folder for ``gguf`` at ``out``; a folder already there is replaced only once the new
    one is complete. ``python`` runs the steps and needs the ``convert`` and ``onnx`` extras."""
    if precision not in PRECISIONS:
        raise InvalidInput(f"unknown ONNX precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    children.require(NEEDS, "making an ONNX variant", "convert,onnx")
    gguf, out = gguf.absolute(), out.resolve()  # the children run elsewhere (a memfd's path stays as given)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Beside ``out``, so the result moves into place with a rename. It is also the children's working directory:
    # hyphenated names inside cannot shadow a module there.
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        work = Path(tmp)
        hf, built = work / "hf-weights", work / "onnx-model"
        status("dequantizing GGUF to Hugging Face weights")
        _child(python, work, "hf", str(gguf), str(hf))
        status(f"building ONNX ({precision})")
        _child(python, work, "onnx", str(hf), str(built), precision, str(work / "builder-cache"))
        if out.exists():
            out.rename(work / "previous")  # removed with the rest of the work dir
        built.rename(out)


def _child(python: str, work: Path, *args: str) -> None:
    what = "dequantizing the GGUF" if args[0] == "hf" else "building the ONNX model"
    children.run("slmops.ops.onnx_export", list(args), work, what, python=python)


def to_hf(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a Hugging Face folder (float32 safetensors, config, tokenizer, chat template)."""
    from slmops.store.gguf_scan import scan_gguf

    scan_gguf(gguf)  # a bad file stops here, before transformers reads it
    from slmops.ops import hf_gguf

    save_hf(hf_gguf.model(gguf), hf_gguf.tokenizer(gguf), gguf, out)


def save_hf(model, tok, gguf: Path, out: Path) -> None:  # type: ignore[no-untyped-def]
    """Save a model loaded from ``gguf`` as a Hugging Face folder that ORT GenAI's builder and llama.cpp's
    converter both read as the original: plain RoPE spelled out, and the tokenizer repaired."""
    from slmops.store.gguf_scan import scan_gguf

    add_bos = bool(scan_gguf(gguf).metadata.get("tokenizer.ggml.add_bos_token", False))
    # The builder, written for transformers 5, iterates ``rope_scaling`` whenever the attribute exists; 4.57 has
    # it as None for plain RoPE. Spelled out, the default is the same maths.
    if model.config.rope_scaling is None:
        model.config.rope_scaling = {"rope_type": "default"}
    model.save_pretrained(out)
    tok.save_pretrained(out)
    repair_tokenizer(out, eos=tok.convert_ids_to_tokens(model.config.eos_token_id), add_bos=add_bos)


def repair_tokenizer(folder: Path, eos: str, add_bos: bool) -> None:
    """Undo two slips of transformers' GGUF tokenizer conversion that the ONNX model would inherit (and that
    would stop llama.cpp's converter from recognising the pre-tokenizer on the way back to GGUF).

    For a Llama-architecture GGUF, transformers names the BOS token as eos, so the builder makes ``<|im_start|>``
    an end of sequence too; ``eos`` is the GGUF's own. And a GPT-2 byte-level BPE (``tokenizer.ggml.model gpt2``,
    as SmolLM2 ships) gets a SentencePiece-style decoder (ByteFallback, '▁' → ' ', then ByteLevel) and a post-
    processor that always prepends BOS. ORT GenAI's tokenizer reads that decoder as SentencePiece and encodes
    every space as -1 ids, so the model would see garbage; the byte-level layout such models ship with on the Hub
    fixes it, with BOS only where the GGUF asks for it.
    """
    tj = json.loads((folder / "tokenizer.json").read_text())
    decoders = (tj.get("decoder") or {}).get("decoders") or []
    byte_level = any(d.get("type") == "ByteLevel" for d in decoders)
    if byte_level:
        # A byte-level BPE has no SentencePiece model: one saved beside it (transformers writes a stray one when
        # sentencepiece is installed) would be read first, by llama.cpp's converter among others.
        (folder / "tokenizer.model").unlink(missing_ok=True)
        tj["normalizer"] = None
        tj["model"]["byte_fallback"] = False
        tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
        if not add_bos:
            tj["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                                    "use_regex": True}
        (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("eos_token_id", "bos_token_id", "unk_token_id", "pad_token_id", "legacy", "model_type"):
        tc.pop(key, None)
    tc.update(eos_token=eos, pad_token=eos)
    if byte_level:
        tc.update(tokenizer_class="GPT2Tokenizer", add_bos_token=add_bos, add_eos_token=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    special = json.loads((folder / "special_tokens_map.json").read_text())
    special.update(eos_token=eos, pad_token=eos)
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False))


def build(hf: Path, out: Path, precision: str, cache: Path) -> None:
    """Run the ORT GenAI model builder on a Hugging Face folder, for CPU.

    onnxruntime-genai 0.18.0's builder imports two Qwen3.5 classes at module level that transformers 4.57.6
    lacks; it uses them only for Qwen3.5 models, so stand-ins let it build the rest.
    """
    import runpy

    import transformers

    for name in ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"):
        if not hasattr(transformers, name):
            setattr(transformers, name, type(name, (), {}))
    sys.argv = ["builder", "-i", str(hf), "-o", str(out), "-e", "cpu", "-c", str(cache), *PRECISIONS[precision]]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
    if not (out / "genai_config.json").is_file():
        raise SystemExit(f"the builder wrote no genai_config.json to {out}")


def main(argv: list[str]) -> None:
    """The children's side: ``hf GGUF HF_DIR`` or ``onnx HF_DIR OUT PRECISION CACHE_DIR``."""
    step, *args = argv
    if step == "hf":
        to_hf(Path(args[0]), Path(args[1]))
    elif step == "onnx":
        build(Path(args[0]), Path(args[1]), args[2], Path(args[3]))
    else:
        raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
