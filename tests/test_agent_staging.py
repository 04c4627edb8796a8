"""Staging a release in a slot from a real registry (Debian's docker-registry): digest-pinned pulls that fetch only
the blobs a store lacks, the slot's hidden name, the manifest kept byte for byte, and model signatures checked with
the device's trusted keys. Fast: the models are tiny GGUFs."""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry import BINARY, Registry
from slot_server import stored, tiny_models
from slmops.api.fleet import ReleaseTarget
from slmops.fleet.agent.staging import Stager, slot_name
from slmops.security import signing
from slmops.security.signing import TrustPolicy
from slmops.store.pushing import push_to_registry
from slmops.store.registry_auth import RegistryConfig
from slmops.store.store import Store
from slmops.types.errors import IntegrityError, UntrustedModel
from slmops.types.name import ModelName, Reference

INSECURE = RegistryConfig(insecure=True)


@dataclass
class Pushed:
    registry: Registry
    refs: dict[str, str]  # role -> host/fleet/smol:tag
    digests: dict[str, str]
    bundles: dict[str, str]  # role -> base64 bundle
    trusted: Path
    stranger_bundle: str  # v0 signed by a key the device does not trust
    blobs: dict[str, set[str]]  # role -> digests of its config and layers


@pytest.fixture(scope="module")
def pushed(tmp_path_factory) -> Pushed:
    """``v0`` signed with the release key, ``v1`` another model, unsigned."""
    from test_signing import keypair

    assert Path(BINARY).exists(), "docker-registry is missing: apt-get install -y docker-registry (.ci/run does)"
    tmp = tmp_path_factory.mktemp("staging")
    reg = Registry(tmp / "registry")
    refs = {role: f"{reg.host}/fleet/smol:{role}" for role in ("v0", "v1")}
    models = tiny_models(tmp / "gguf", 2)
    store = stored(tmp / "pusher", models[0], refs["v0"], allow_internal_registries=True)
    stored(tmp / "pusher", models[1], refs["v1"])
    priv, pub = keypair(tmp, "release")
    other, _ = keypair(tmp, "stranger")
    v0 = ModelName.parse(refs["v0"])
    signing.sign(store, v0, other)
    stranger = base64.b64encode(store.signature_path(v0).read_bytes()).decode()
    signing.sign(store, v0, priv)
    for ref in refs.values():
        push_to_registry(store, Reference.parse(ref), lambda *a: None, INSECURE)
    digests = {role: str(store.manifests.digest(ModelName.parse(ref))) for role, ref in refs.items()}
    bundles = {"v0": base64.b64encode(store.signature_path(v0).read_bytes()).decode()}
    blobs = {role: {layer.digest for layer in store.manifest(ModelName.parse(ref)).all_layers()}
             for role, ref in refs.items()}
    yield Pushed(reg, refs, digests, bundles, pub, stranger, blobs)
    reg.stop()


def target(p: Pushed, role: str, release: str, **kw: str | None) -> ReleaseTarget:
    fields = {"release": release, "variant": "cpu", "reference": f"{p.refs[role]}@{p.digests[role]}",
              "manifest_digest": p.digests[role], "signature": p.bundles.get(role), **kw}
    return ReleaseTarget.model_validate(fields)


def blob_gets(p: Pushed, role: str) -> int:
    """Blobs of ``role``'s model the registry served (not its signature artifact's)."""
    return len([r for r in p.registry.requests("GET", "/blobs/sha256:")
                if r[1] == 200 and r[0].rsplit("/", 1)[1] in p.blobs[role]])


def device(tmp_path: Path) -> Store:
    return Store(tmp_path / "device" / "models", allow_internal_registries=True)


def test_a_pinned_pull_is_stored_under_the_slot_name_and_fetches_only_missing_blobs(pushed, tmp_path, caplog):
    store = device(tmp_path)
    stager = Stager(store, INSECURE)
    before = blob_gets(pushed, "v0")
    with caplog.at_level(logging.WARNING, "slmops.agent"):
        a = stager.stage(target(pushed, "v0", "smol:1.0.0"), "a")
    assert a == ModelName.parse("slot/smol-a:1.0.0") and a == slot_name("smol:1.0.0", "a")
    assert str(store.manifests.digest(a)) == pushed.digests["v0"]  # byte for byte: the registry's digest
    assert store.signature_path(a).read_bytes() == base64.b64decode(pushed.bundles["v0"])
    assert "no SLMOPS_TRUSTED_KEYS" in caplog.text  # signed, but nothing here can check it: said once
    assert [r.name.display for r in store.list()] == ["slot/smol-a:1.0.0"]  # the registry name is gone again
    assert blob_gets(pushed, "v0") - before == 2  # the config and the model

    b = stager.stage(target(pushed, "v0", "smol:1.0.1"), "b")  # the same manifest in the other slot
    assert blob_gets(pushed, "v0") - before == 2  # every blob was there: none fetched again
    assert str(store.manifests.digest(b)) == pushed.digests["v0"]

    a2 = stager.stage(target(pushed, "v1", "smol:2+build.7"), "a", replaces=a.display)
    assert a2.display == "slot/smol-a:2_build.7"  # a version's "+" is outside the tag grammar
    assert {r.name.display for r in store.list()} == {"slot/smol-a:2_build.7", "slot/smol-b:1.0.1"}
    assert not store.signature_path(a2).exists()  # v1 is unsigned
    store.verify(b)  # v0's blobs stayed: slot b uses them


def test_references_that_do_not_pin_the_release_digest_are_refused(pushed, tmp_path):
    store = device(tmp_path)
    stager = Stager(store, INSECURE)
    unpinned = target(pushed, "v0", "smol:1", reference=pushed.refs["v0"])
    other = target(pushed, "v0", "smol:1", manifest_digest=pushed.digests["v1"])
    for bad in (unpinned, other):
        with pytest.raises(IntegrityError, match="does not pin its manifest digest"):
            stager.stage(bad, "a")
    assert store.list() == []


def test_with_trusted_keys_only_a_target_signed_by_one_of_them_is_staged(pushed, tmp_path):
    store = device(tmp_path)
    stager = Stager(store, INSECURE, [pushed.trusted])
    good = stager.stage(target(pushed, "v0", "smol:1"), "a")
    Store(store.root, trust=TrustPolicy([pushed.trusted])).verify(good)  # what the server checks on load
    with pytest.raises(UntrustedModel, match="not signed and this device requires signatures"):
        stager.stage(target(pushed, "v1", "smol:2"), "b")
    with pytest.raises(UntrustedModel, match="not signed by a trusted key"):
        stager.stage(target(pushed, "v0", "smol:3", signature=pushed.stranger_bundle), "b")
    assert [r.name.display for r in store.list()] == ["slot/smol-a:1"]  # nothing refused stayed


@pytest.mark.parametrize("release,expected", [
    ("smol:1.0.0", "slot/smol-a:1.0.0"), ("smol:V2-RC.1", "slot/smol-a:v2-rc.1"),
    ("smol:.hidden", "slot/smol-a:_hidden"), ("a.b_c:1+x", "slot/a.b_c-a:1_x")])
def test_slot_names_stay_in_the_name_grammar(release, expected):
    assert slot_name(release, "a").display == expected
