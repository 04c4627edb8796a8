import pytest
from hypothesis import given, strategies as st

from slmops.config.settings import Settings, parse_duration
from slmops.types.digest import Digest
from slmops.types.errors import ConfigError, InvalidDigest, InvalidName
from slmops.types.name import ModelName


@pytest.mark.parametrize("text,expected", [
    ("smollm2", ("registry.ollama.ai", "library", "smollm2", "latest")),
    ("smollm2:135m", ("registry.ollama.ai", "library", "smollm2", "135m")),
    ("me/my-model:v1.2", ("registry.ollama.ai", "me", "my-model", "v1.2")),
    ("localhost:5000/team/m:q4_0", ("localhost:5000", "team", "m", "q4_0")),
    ("SmolLM2:135M", ("registry.ollama.ai", "library", "smollm2", "135m")),
])
def test_name_parses_with_defaults(text, expected):
    n = ModelName.parse(text)
    assert (n.host, n.namespace, n.model, n.tag) == expected


@pytest.mark.parametrize("bad", [
    "", " ", "../etc/passwd", "a/../b", "..", "a/b/c/d", "model:", ":tag", "a//b", "/abs", "name:../x",
    "x:" + "t" * 81, "m" * 81, "host:99x/ns/m", "white space", "a\\b", "sha256:..", ".hidden", "ns/..:t",
])
def test_bad_names_are_rejected_with_the_grammar(bad):
    with pytest.raises(InvalidName, match=r"expected \[host/\]\[namespace/\]model\[:tag\]"):
        ModelName.parse(bad)


@given(st.text(alphabet="abcXYZ019._-:/%\\ ", max_size=40))
def test_any_accepted_name_stays_inside_the_store(text):
    try:
        n = ModelName.parse(text)
    except InvalidName:
        return
    for part in n.path_parts:
        assert part and "/" not in part and "\\" not in part and part not in (".", "..") and ".." not in part
    assert ModelName.parse(str(n)) == n
    assert ModelName.from_path_parts(*n.path_parts) == n


def test_digest_accepts_only_sha256_hex():
    d = Digest.parse("sha256:" + "a" * 64)
    assert str(d) == "sha256:" + "a" * 64 and d.filename == "sha256-" + "a" * 64
    assert Digest.parse("sha256-" + "a" * 64) == d
    for bad in ["sha256:" + "A" * 64, "sha256:" + "a" * 63, "md5:" + "a" * 32, "sha256:../../etc/passwd",
                "sha256:" + "a" * 64 + "/x", "", "sha256:" + "g" * 64]:
        with pytest.raises(InvalidDigest):
            Digest.parse(bad)


@pytest.mark.parametrize("text,seconds", [("5m", 300), ("300", 300), ("1h30m", 5400), ("-1", -1), ("0", 0),
                                          ("1.5s", 1.5), ("250ms", 0.25), ("-1m", -60)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_settings_defaults_origins_and_errors(tmp_path):
    s = Settings.from_env({"SLMOPS_HOME": str(tmp_path)})
    assert s.home == tmp_path and s.origins["SLMOPS_HOME"] == "env"
    assert s["SLMOPS_HOST"] == ("127.0.0.1", 11434) and s.origins["SLMOPS_HOST"] == "default"
    assert Settings.from_env({"SLMOPS_HOST": "0.0.0.0:8080"})["SLMOPS_HOST"] == ("0.0.0.0", 8080)
    assert Settings.from_env({"SLMOPS_HOST": "[::1]:9"})["SLMOPS_HOST"] == ("::1", 9)
    with pytest.raises(ConfigError, match="SLMOPS_KEEP_ALIVE='soon' is invalid"):
        Settings.from_env({"SLMOPS_KEEP_ALIVE": "soon"})
    with pytest.raises(ConfigError, match="SLMOPS_HOST"):
        Settings.from_env({"SLMOPS_HOST": "localhost:99999"})
