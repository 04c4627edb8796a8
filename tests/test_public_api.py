import slmops


def test_public_api_is_declared():
    assert set(slmops.__all__) >= {"load", "pull", "Model", "Store", "ModelName", "Digest", "SlmopsError",
                                   "ModelNotFound", "Result", "Output", "Stats", "DEFAULT_MODEL"}
    for name in slmops.__all__:
        assert hasattr(slmops, name), name


def test_load_generate_chat_tokenize(shared_home):
    with slmops.load("smollm2:135m", home=shared_home, num_ctx=1024) as model:
        r = model.generate("The capital of France is", raw=True, options={"temperature": 0, "num_predict": 4})
        assert isinstance(r, slmops.Result) and "Paris" in r.text and r.stats.eval_count <= 4
        pieces = list(model.chat([{"role": "user", "content": "Hi"}], options={"num_predict": 5}, stream=True))
        assert pieces[-1].done and pieces[-1].stats.eval_count <= 5
        toks = model.tokenize("hello world")
        assert model.detokenize(toks) == "hello world"


def test_unknown_model_raises_model_not_found(tmp_path):
    import pytest
    with pytest.raises(slmops.ModelNotFound, match='model "nope:latest" not found'):
        slmops.load("nope", home=tmp_path)
