import struct
import subprocess
import sys

import pytest

from slmops.store.gguf import inspect_gguf
from slmops.types.errors import InvalidModelFile


def test_real_model_validates(model_file):
    info = inspect_gguf(model_file)
    assert info.architecture == "llama" and info.file_type == "Q4_1" and info.context_length == 8192
    assert 130e6 < info.parameter_count < 140e6 and info.chat_template.startswith("{% for message")


def test_validating_a_model_does_not_import_numpy(model_file):
    """A fresh ``slmops pull`` validates the GGUF it downloaded: the whole gguf package (numpy with it) took ~150 ms
    there, after the download, for a 9 ms scan. Only its constants are loaded, and their values are gguf's."""
    code = ("import sys, pathlib; from slmops.store.gguf import inspect_gguf; "
            "info = inspect_gguf(pathlib.Path(sys.argv[1])); numpy = 'numpy' in sys.modules; "
            "from slmops.store.gguf_scan import GGML_QUANT_SIZES as ours; import gguf; "
            "print(info.file_type, numpy, dict(ours) == dict(gguf.GGML_QUANT_SIZES))")
    out = subprocess.run([sys.executable, "-c", code, str(model_file)], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["Q4_1", "False", "True"]


@pytest.mark.parametrize("fraction", [0.0001, 0.5, 0.999])
def test_truncated_file_is_rejected(tmp_path, model_file, fraction):
    data = model_file.read_bytes()
    p = tmp_path / "t.gguf"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InvalidModelFile):
        inspect_gguf(p)


def test_bad_magic_and_version(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(InvalidModelFile, match="not a GGUF file"):
        inspect_gguf(p)
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 99, 0, 0))
    with pytest.raises(InvalidModelFile, match="unsupported GGUF version 99"):
        inspect_gguf(p)


def test_absurd_counts_are_rejected_before_parsing(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 2**60) + b"\0" * 64)
    with pytest.raises(InvalidModelFile, match="more than a .*-byte file can hold"):
        inspect_gguf(p)


def test_tensor_offset_past_the_end_is_rejected(tmp_path, model_file):
    """Patch the last tensor's data offset to point beyond the file."""
    from gguf import GGUFReader
    r = GGUFReader(model_file)
    last = r.tensors[-1]
    offset_field = last.field.parts[-1]
    pos = last.field.offset + sum(int(p.nbytes) for p in last.field.parts[:-1])
    data = bytearray(model_file.read_bytes())
    assert struct.unpack_from("<Q", data, pos)[0] == int(offset_field[0])
    struct.pack_into("<Q", data, pos, len(data) * 4)
    p = tmp_path / "crafted.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(InvalidModelFile):
        inspect_gguf(p)


def test_cache_follows_file_identity(tmp_path, model_file):
    cache = tmp_path / "cache"
    p = tmp_path / "m.gguf"
    p.write_bytes(model_file.read_bytes())
    first = inspect_gguf(p, cache)
    assert len(list(cache.iterdir())) == 1
    assert inspect_gguf(p, cache) == first
    p.write_bytes(p.read_bytes()[:1000])  # a changed file is validated again, not served from cache
    with pytest.raises(InvalidModelFile):
        inspect_gguf(p, cache)
