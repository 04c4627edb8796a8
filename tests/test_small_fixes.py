"""Limits on keys must be positive, a registry port must be a port, and `store seal`/`unseal` with another key
than the store's is an error that says so, never "all sealed"."""

import pytest

from conftest import run_cli
from slmops.security.keys import KeyStore
from slmops.store.store import Store
from slmops.types.errors import ConfigError, InvalidInput, InvalidName
from slmops.types.name import ModelName

KEY = "5e" * 32
OTHER_KEY = "a7" * 32


# -- key limits ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rpm,tpm", [(-3, 0), (0, -1), (-1, -1)])
def test_key_store_refuses_negative_limits(tmp_path, rpm, tpm):
    with pytest.raises(InvalidInput, match="per minute"):
        KeyStore(tmp_path / "keys.json").create("ci", "user", rpm, tpm)
    assert not (tmp_path / "keys.json").exists()


@pytest.mark.parametrize("args", [("--rpm", "-3"), ("--rpm", "0"), ("--tpm", "0"), ("--tpm", "-100")])
def test_keys_create_refuses_limits_that_are_not_positive(tmp_path, args):
    r = run_cli("keys", "create", "--name", "ci", *args, home=tmp_path)
    assert r.returncode == 1 and r.stderr.startswith(f"Error: {args[0]} must be a positive"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not r.stdout
    assert not KeyStore(tmp_path / "keys.json").keys()


def test_keys_create_keeps_the_server_default_when_no_limit_is_given(tmp_path):
    assert run_cli("keys", "create", "--name", "a", home=tmp_path).returncode == 0
    assert run_cli("keys", "create", "--name", "b", "--rpm", "5", "--tpm", "900", home=tmp_path).returncode == 0
    a, b = KeyStore(tmp_path / "keys.json").keys()
    assert (a.requests_per_minute, a.tokens_per_minute) == (0, 0)
    assert (b.requests_per_minute, b.tokens_per_minute) == (5, 900)


# -- registry ports ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["host:65536/ns/m", "host:99999/ns/m", "host:0/ns/m", "host:00/ns/m",
                                 "host:080/ns/m"])
def test_a_host_port_must_be_1_to_65535(bad):
    with pytest.raises(InvalidName, match="port"):
        ModelName.parse(bad)


@pytest.mark.parametrize("good", ["host:1/ns/m", "host:80/ns/m", "localhost:5000/ns/m", "host:65535/ns/m"])
def test_host_ports_in_range_are_accepted(good):
    assert ModelName.parse(good).host == good.split("/")[0]


# -- sealing with another key --------------------------------------------------------------------------------------
def _mixed_store(home) -> tuple[Store, list, list]:
    """Two blobs sealed with KEY, one plain."""
    sealed_store = Store(home / "models", key=bytes.fromhex(KEY))
    sealed = [sealed_store.blobs.put_bytes(b"a" * 3000)[0], sealed_store.blobs.put_bytes(b"b" * 3000)[0]]
    plain = [Store(home / "models").blobs.put_bytes(b"c" * 3000)[0]]
    return sealed_store, sealed, plain


def _snapshot(store: Store) -> dict:
    return {d: store.blobs.path(d).read_bytes() for d in store.blobs.digests()}


@pytest.mark.parametrize("seal", [True, False])
def test_reseal_with_another_key_changes_nothing_and_says_how_many(tmp_path, seal):
    store, sealed, plain = _mixed_store(tmp_path)
    before = _snapshot(store)
    wrong = Store(tmp_path / "models", key=bytes.fromhex(OTHER_KEY))
    with pytest.raises(ConfigError, match="2 of 2 sealed blob"):
        wrong.reseal(seal)
    assert _snapshot(store) == before
    assert store.reseal(True) == (1, 3)  # the right key: the plain one is sealed
    assert all(store.blobs.is_sealed(d) for d in sealed + plain)


@pytest.mark.parametrize("command", ["seal", "unseal"])
def test_store_seal_command_with_another_key_is_a_clear_error(tmp_path, command):
    store, _, _ = _mixed_store(tmp_path)
    before = _snapshot(store)
    r = run_cli("store", command, home=tmp_path, SLMOPS_STORE_KEY=OTHER_KEY)
    assert r.returncode == 1 and r.stderr.startswith("Error: 2 of 2 sealed blob(s)"), r.stdout + r.stderr
    assert "another key" in r.stderr and "SLMOPS_STORE_KEY" in r.stderr and "all" not in r.stdout
    assert len(r.stderr.strip().splitlines()) == 1
    assert _snapshot(store) == before
    ok = run_cli("store", command, home=tmp_path, SLMOPS_STORE_KEY=KEY)
    assert ok.returncode == 0 and f"all 3 blob(s) are now {'sealed' if command == 'seal' else 'plain'}" in ok.stdout
