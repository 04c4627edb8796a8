"""Model signing in the OpenSSF format with local EC keys, and the SLMOPS_TRUSTED_KEYS policy on pull, create
and load, through the CLI, the store and a real server."""

import base64
import json

import httpx
import ollama
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from conftest import Server, link_home, local_catalog, run_cli
from slmops.security.signing import TrustPolicy
from slmops.store.sources import default_sources
from slmops.store.store import Store
from slmops.types.errors import UntrustedModel
from slmops.types.name import ModelName

M = "smollm2:135m"


def keypair(folder, name, curve=ec.SECP256R1()):
    key = ec.generate_private_key(curve) if curve else ed25519.Ed25519PrivateKey.generate()
    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture
def signed_home(tmp_path, shared_home):
    home = link_home(shared_home, tmp_path / "h")
    priv, pub = keypair(tmp_path, "release")
    r = run_cli("sign", M, "--key", str(priv), home=home)
    assert r.returncode == 0, r.stderr
    return home, priv, pub


def test_sign_writes_a_sigstore_bundle_beside_the_model_and_verify_accepts_it(signed_home, tmp_path):
    home, _, pub = signed_home
    sig = home / "models" / "signatures" / "registry.ollama.ai" / "library" / "smollm2" / "135m.sig"
    bundle = json.loads(sig.read_text())
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    subjects = {r["name"] for r in statement["predicate"]["resources"]}
    manifest = json.loads(next((home / "models" / "manifests").rglob("135m")).read_text())
    blobs = {f"blobs/{layer['digest'].replace(':', '-')}" for layer in [manifest["config"], *manifest["layers"]]}
    assert subjects == {"manifest.json"} | blobs  # the manifest and every blob
    ok = run_cli("verify", M, "--key", str(pub), home=home)
    assert ok.returncode == 0 and "signature verified with release.pub" in ok.stdout
    _, stranger = keypair(tmp_path, "stranger", ec.SECP384R1())
    bad = run_cli("verify", M, "--key", str(stranger), home=home)
    assert bad.returncode == 1 and bad.stderr.startswith("Error:") and "not signed by a trusted key" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_changed_manifest_fails_verification(signed_home):
    home, _, pub = signed_home
    path = next((home / "models" / "manifests").rglob("135m"))
    path.write_text(path.read_text().replace('"schemaVersion":2', '"schemaVersion": 2') + " ")
    r = run_cli("verify", M, "--key", str(pub), home=home)
    assert r.returncode == 1 and "changed after signing" in r.stderr


def test_keys_model_signing_refuses_are_a_clear_error(tmp_path, cli_home):
    priv, _ = keypair(tmp_path, "edwards", curve=None)
    r = run_cli("sign", M, "--key", str(priv), home=cli_home)
    assert r.returncode == 1 and "P-256 or P-384" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert run_cli("sign", M, "--key", str(tmp_path / "absent.pem"), home=cli_home).stderr.startswith(
        "Error: private key absent.pem does not exist")


def test_trusted_keys_gate_loading_and_creating(signed_home):
    home, priv, pub = signed_home
    s = Server(home, SLMOPS_TRUSTED_KEYS=str(pub))
    try:
        c = ollama.Client(host=s.url)
        assert c.generate(model=M, prompt="hi", options={"num_predict": 2}).done  # signed: loads
        c.copy(M, "copied")  # the signature covers content, not names
        assert c.generate(model="copied", prompt="hi", options={"num_predict": 2}).done
        c.create(model="derived", from_=M, system="You are terse.")  # a signed base may be built on...
        with pytest.raises(ollama.ResponseError) as err:  # ...but the new model is unsigned until signed
            c.generate(model="derived", prompt="hi")
        assert err.value.status_code == 403 and "not signed" in err.value.error
        assert run_cli("sign", "derived", "--key", str(priv), home=home).returncode == 0
        assert c.generate(model="derived", prompt="hi", options={"num_predict": 2}).done
        blob = "sha256:" + json.loads(next((home / "models" / "manifests").rglob("135m")).read_text())[
            "layers"][0]["digest"].split(":")[1]
        r = httpx.post(s.url + "/api/create", json={"model": "raw", "files": {"m.gguf": blob}, "stream": False},
                       timeout=120)
        assert r.status_code == 403 and "carries no signature" in r.json()["error"]
    finally:
        s.stop()


def test_an_untrusted_pull_is_refused_and_not_kept(home, model_file, tmp_path):
    _, pub = keypair(tmp_path, "release")
    store = Store(home / "models", catalog=local_catalog(model_file), sources=default_sources(),
                  trust=TrustPolicy([pub]))
    with pytest.raises(UntrustedModel, match="is not signed"):
        store.pull(ModelName.parse(M))
    assert not store.exists(ModelName.parse(M)) and not store.blobs.digests()
