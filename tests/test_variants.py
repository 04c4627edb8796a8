"""Choosing a model variant for the machine: preference order, fallback, CPU requirements, pinning."""

import pytest

from slmops.store.catalog import Catalog
from slmops.store.variants import Offer, Variant, choose, order
from slmops.types.errors import InvalidInput
from slmops.types.name import ModelName

VARIANTS = [
    Variant("npu-onnx", "npu", format="onnx", export="int4"),
    Variant("cuda-f16", "gpu", quantize="f16"),
    Variant("cpu-q4_0-avx512", "cpu", quantize="q4_0", requires=("avx512f",)),
    Variant("cpu-q4_1", "cpu"),
    Variant("cpu-q8_0", "cpu", quantize="q8_0"),
]
CPU_ONLY = Offer({"cpu": None, "gpu": "no NVIDIA GPU found", "npu": "no NPU found"}, frozenset({"avx2"}))
WITH_GPU = Offer({"cpu": None, "gpu": None, "npu": "no NPU found"}, frozenset({"avx2", "avx512f"}))
NPU_BOX = Offer({"cpu": None, "gpu": "no NVIDIA GPU found", "npu": None}, frozenset({"neon"}))


def test_the_seed_order_falls_back_from_npu_to_gpu_to_cpu_and_says_why():
    seed = order("npu", ["gpu", "cpu"])
    c = choose("m", VARIANTS, CPU_ONLY, seed)
    assert c.variant.name == "cpu-q4_1"
    assert c.reasons == ["npu-onnx skipped: ONNX Runtime GenAI is not installed (pip install 'slmops[onnx]')", "cuda-f16 skipped: no NVIDIA GPU found",
                         "cpu-q4_0-avx512 skipped: this CPU lacks avx512f", "cpu-q4_1: first cpu variant this machine runs"]
    assert choose("m", VARIANTS, WITH_GPU, seed).variant.name == "cuda-f16"
    assert choose("m", VARIANTS, NPU_BOX, seed).variant.name == "cpu-q4_1"  # an NPU, but no engine for its format
    with_genai = Offer(NPU_BOX.unavailable, NPU_BOX.cpu_features, frozenset({"gguf", "onnx"}))
    assert choose("m", VARIANTS, with_genai, seed).variant.name == "npu-onnx"
    assert choose("m", VARIANTS, WITH_GPU, order("cpu", [])).variant.name == "cpu-q4_0-avx512"


def test_no_allowed_accelerator_is_a_clear_error():
    with pytest.raises(InvalidInput, match="no variant of m runs here with hardware order gpu .*pin one with --variant"):
        choose("m", VARIANTS, CPU_ONLY, order("gpu", []))
    with pytest.raises(InvalidInput, match="unknown accelerator 'tpu'"):
        order("tpu", ["cpu"])
    assert order(None, None) == ["npu", "gpu", "cpu"]
    assert order("gpu", ["cpu", "gpu"]) == ["gpu", "cpu"]


def test_pinning_takes_a_listed_variant_even_off_its_hardware_but_never_an_unloadable_format():
    c = choose("m", VARIANTS, CPU_ONLY, order("cpu", []), pinned="cuda-f16")
    assert c.variant.name == "cuda-f16" and c.why == "cuda-f16 pinned with --variant (note: no NVIDIA GPU found)"
    with pytest.raises(InvalidInput, match="has no variant 'q3'; choose one of npu-onnx, cuda-f16"):
        choose("m", VARIANTS, CPU_ONLY, [], pinned="q3")
    with pytest.raises(InvalidInput, match=r"variant npu-onnx of m cannot run: ONNX Runtime GenAI is not installed"):
        choose("m", VARIANTS, NPU_BOX, [], pinned="npu-onnx")


def test_the_builtin_catalog_lists_variants_for_the_default_model():
    entry = Catalog.builtin().lookup(ModelName.parse("smollm2:135m"))
    names = [v.name for v in entry.variants]
    assert names[0] == "cpu-q4_1" and {"cpu-q8_0", "cuda-f16", "cpu-onnx-int4"} <= set(names)
    onnx = Catalog.builtin().lookup(ModelName.parse("smollm2:135m-onnx"))
    assert [(v.name, v.format, v.export) for v in onnx.variants] == [("cpu-onnx-int4", "onnx", "int4"),
                                                                     ("cpu-onnx-int8", "onnx", "int8")]
    assert entry.variants[0].quantize is None  # the shipped, digest-pinned file is the first CPU choice
    assert choose("smollm2:135m", entry.variants, CPU_ONLY, order("npu", ["gpu", "cpu"])).variant.name == "cpu-q4_1"


def test_pull_stores_the_variant_chosen_for_the_machine_and_says_why(home, model_file, shared_home):
    from conftest import local_catalog
    from slmops.ops.variants import MachinePolicy
    from slmops.store.sources import default_sources
    from slmops.store.store import Store

    gpu_box = MachinePolicy("npu", ("gpu", "cpu"), probe=lambda: WITH_GPU)
    store = Store(home / "models", catalog=local_catalog(model_file), sources=default_sources(), variants=gpu_box)
    name = ModelName.parse("smollm2:135m")
    store.pull(name)
    assert store.inspect(name).file_type == "F16"  # cuda-f16, made from the shipped Q4_1 file
    variant, why = store.variant(name)
    assert variant == "cuda-f16" and why.startswith("npu: smollm2:135m has no npu variant; cuda-f16: first gpu")
    shipped = Catalog.builtin().lookup(name).digest
    assert not store.blobs.has(shipped)  # the file it was made from is not kept
    store.verify(name)

    cpu_box = Store(home / "models", catalog=local_catalog(model_file), sources=default_sources(),
                    variants=MachinePolicy(probe=lambda: CPU_ONLY))
    cpu_box.pull(name)
    assert cpu_box.inspect(name).file_type == "Q4_1" and cpu_box.variant(name)[0] == "cpu-q4_1"
    assert cpu_box.record(name).manifest.layer("application/vnd.ollama.image.model").digest == str(shipped)
    cpu_box.pull(name, variant="cpu-q8_0")
    assert cpu_box.inspect(name).file_type == "Q8_0"
    assert cpu_box.variant(name) == ("cpu-q8_0", "cpu-q8_0 pinned with --variant")
    with pytest.raises(InvalidInput, match="has no variant 'gpu-int3'"):
        cpu_box.pull(name, variant="gpu-int3")
