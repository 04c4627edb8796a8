"""GGUF → ONNX Runtime GenAI folder (slmops.ops.onnx_export): refusals without a model, and the real default model
built once per machine (the ``onnx_folder`` fixture) answering through onnxruntime-genai."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from onnx_model import onnx_folder  # noqa: F401

from slmops.ops import children
from slmops.ops.onnx_export import export
from slmops.types.errors import InvalidInput, SourceError

QUESTION = "What is the capital of France? Answer in one word."


def test_missing_dependencies_are_named_with_the_extra_to_install(monkeypatch, tmp_path: Path):
    real = importlib.util.find_spec
    monkeypatch.setattr(children.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime_genai" else real(name, *a))
    out = tmp_path / "out"
    with pytest.raises(SourceError, match=r"onnxruntime_genai.*slmops\[convert,onnx\]"):
        export(tmp_path / "model.gguf", out)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_precision_is_refused(tmp_path: Path):
    with pytest.raises(InvalidInput, match="int4"):
        export(tmp_path / "model.gguf", tmp_path / "out", precision="q4_k_m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first run builds the folder: about a minute quiet, a few on a busy machine
def test_the_default_model_becomes_a_folder_that_answers(onnx_folder: Path):  # noqa: F811
    og = pytest.importorskip("onnxruntime_genai")
    names = {p.name for p in onnx_folder.iterdir()}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= names
    assert not any(n.startswith(".") for n in names)
    genai = json.loads((onnx_folder / "genai_config.json").read_text())
    assert genai["model"]["eos_token_id"] == 2  # <|im_end|> alone, not also <|im_start|>
    assert genai["model"]["context_length"] == genai["search"]["max_length"] == 8192

    config = og.Config(str(onnx_folder))
    config.clear_providers()
    model = og.Model(config)
    tok = og.Tokenizer(model)
    assert tok.encode("Hello world").tolist() == [19556, 905]  # no -1 ids for the space, no BOS
    prompt = tok.apply_chat_template(json.dumps([{"role": "user", "content": QUESTION}]), add_generation_prompt=True)
    ids = tok.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 32, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    while not gen.is_done():
        gen.generate_next_token()
    answer = tok.decode(gen.get_sequence(0)[len(ids):])
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_a_failed_build_leaves_nothing_behind(tmp_path: Path):
    pytest.importorskip("onnxruntime_genai")
    bad = tmp_path / "src" / "model.gguf"
    bad.parent.mkdir()
    bad.write_bytes(b"not a gguf at all" * 64)
    dest = tmp_path / "dest"
    dest.mkdir()
    steps: list[str] = []
    with pytest.raises(SourceError, match="GGUF"):
        export(bad, dest / "model", status=steps.append)
    assert steps == ["dequantizing GGUF to Hugging Face weights"]
    assert list(dest.iterdir()) == []
