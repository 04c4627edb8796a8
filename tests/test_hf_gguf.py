"""Loading a GGUF through transformers for the PyTorch steps (train, importance, ONNX export): one parse of the
file for its tokenizer and its model, and the model still the real one."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

CHECK = """
import json, sys
from pathlib import Path
import gguf, torch
parses = []
class Counted(gguf.GGUFReader):
    def __init__(self, path, mode="r"):
        parses.append(str(path))
        super().__init__(path, mode)
gguf.GGUFReader = Counted
from slmops.ops import hf_gguf
path = Path(sys.argv[1])
tok = hf_gguf.tokenizer(path)
model = hf_gguf.model(path).eval()
ids = tok("The capital of France is", return_tensors="pt").input_ids
with torch.no_grad():
    best = int(model(ids).logits[0, -1].argmax())
print(json.dumps({"parses": len(parses), "next": tok.decode([best])}))
"""


@pytest.mark.slow
def test_a_tokenizer_and_model_parse_the_file_once_and_answer_as_the_model(model_file):
    r = subprocess.run([sys.executable, "-c", CHECK, str(model_file)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["parses"] == 1  # transformers alone parses it four times (config and weights, twice each)
    assert out["next"] == " Paris"  # the dequantized weights are the model's: its greedy answer
