"""ADAPTER layers are applied: a LoRA GGUF written here with the gguf package changes the real model's output,
and a zero LoRA does not."""

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from slmops.engine import Engine, Request, spec_from_store
from slmops.modelfile import build, parse
from slmops.types.name import ModelName

GREEDY = {"temperature": 0, "num_predict": 12}
Q = [{"role": "user", "content": "Name three colors."}]


def write_lora(path, model_file, scale: float, rank: int = 4):
    base = {t.name: [int(d) for d in t.shape] for t in GGUFReader(model_file).tensors}
    w = GGUFWriter(str(path), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(rank))
    rng = np.random.default_rng(0)
    for name, shape in base.items():
        if not name.endswith("attn_q.weight"):
            continue
        n_in, n_out = shape
        stem = name.removesuffix(".weight")
        w.add_tensor(f"{stem}.weight.lora_a", (rng.standard_normal((rank, n_in)) * scale).astype(np.float32))
        w.add_tensor(f"{stem}.weight.lora_b", (rng.standard_normal((n_out, rank)) * scale).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def answer(store, name):
    engine = Engine(default_ctx=1024)
    try:
        parts = [o.text for o in engine.run(spec_from_store(store, name), Request(messages=Q, options=GREEDY))]
    finally:
        engine.close()
    return "".join(parts)


def test_lora_adapter_changes_output_and_zero_lora_does_not(store, tmp_path, model_file):
    from conftest import DEFAULT
    store.pull(DEFAULT)
    plain = answer(store, DEFAULT)
    for label, scale in (("zero", 0.0), ("strong", 1.0)):
        lora = tmp_path / f"{label}.gguf"
        write_lora(lora, model_file, scale)
        build.create(store, ModelName.parse(label), parse(f"FROM smollm2:135m\nADAPTER {lora}\n"), tmp_path)
    assert answer(store, ModelName.parse("zero")) == plain
    assert answer(store, ModelName.parse("strong")) != plain


def test_adapter_for_another_model_is_a_clear_error(store, tmp_path, model_file):
    from conftest import DEFAULT
    from slmops.types.errors import InvalidInput
    store.pull(DEFAULT)
    lora = tmp_path / "wrong.gguf"
    w = GGUFWriter(str(lora), "llama")
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 100), np.float32))
    w.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((100, 4), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    build.create(store, ModelName.parse("wrong"), parse(f"FROM smollm2:135m\nADAPTER {lora}\n"), tmp_path)
    with pytest.raises(InvalidInput, match="not a LoRA adapter for this model"):
        answer(store, ModelName.parse("wrong"))
