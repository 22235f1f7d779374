from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from audiostream.errors import AuthError, ConfigError, ErrorCode
from audiostream.gateway.keys import KeyStore, create_key, load_records, revoke_key


def test_only_the_hash_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, rec = create_key(path, "acme")
    text = path.read_text()
    secret = key.split("_")[2]
    assert secret not in text and rec.sha256 in text
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert KeyStore(path).verify(key).name == "acme"


def test_wrong_malformed_and_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, _ = create_key(path, "acme")
    store = KeyStore(path)
    for bad in (key + "x", "as_" + "0" * 12 + "_abc", "nonsense", ""):
        with pytest.raises(AuthError) as info:
            store.verify(bad)
        assert info.value.code == ErrorCode.AUTH_FAILED


def test_revocation_is_seen_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, rec = create_key(path, "acme")
    store = KeyStore(path)
    store.verify(key)
    revoke_key(path, "acme")
    # Make sure the modification time moves even on coarse file systems.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    with pytest.raises(AuthError) as info:
        store.verify(key)
    assert info.value.code == ErrorCode.FORBIDDEN
    assert load_records(path)[rec.id].revoked


def test_limits_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, _ = create_key(path, "small", max_sessions=2, pipelines=["gain"])
    rec = KeyStore(path).verify(key)
    assert rec.max_sessions == 2 and rec.pipelines == ("gain",)


def test_bad_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{")
    with pytest.raises(ConfigError):
        load_records(path)
    path.write_text(json.dumps({"keys": [{"id": 1}]}))
    with pytest.raises(ConfigError):
        load_records(path)
    with pytest.raises(ConfigError):
        revoke_key(tmp_path / "none.json", "x")
