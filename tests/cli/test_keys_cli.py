"""`keys`: unique names, revoke exactly one, steps checked against the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audiostream.cli import EXIT_USAGE, main
from audiostream.gateway.keys import load_records
from tests.cli.test_errors import run_cli


def _create(keys: Path, name: str, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main(["keys", "create", name, "--keys-file", str(keys), *extra]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_revoke_by_name_revokes_exactly_that_key(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.json"
    for name in ("alpha", "beta", "gamma"):
        _create(keys, name, capsys)
    assert main(["keys", "revoke", "beta", "--keys-file", str(keys)]) == 0
    state = {r.name: r.revoked for r in load_records(keys).values()}
    assert state == {"alpha": False, "beta": True, "gamma": False}


def test_revoke_by_id_resolves_a_legacy_duplicate(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [
        {"id": "aaaaaaaaaaaa", "name": "twin", "sha256": "0" * 64},
        {"id": "bbbbbbbbbbbb", "name": "twin", "sha256": "1" * 64},
    ]}))
    assert main(["keys", "revoke", "twin", "--keys-file", str(keys)]) == EXIT_USAGE
    assert "aaaaaaaaaaaa, bbbbbbbbbbbb" in capsys.readouterr().err
    assert not any(r.revoked for r in load_records(keys).values())
    assert main(["keys", "revoke", "bbbbbbbbbbbb", "--keys-file", str(keys)]) == 0
    assert {r.id: r.revoked for r in load_records(keys).values()} == {
        "aaaaaaaaaaaa": False, "bbbbbbbbbbbb": True}


def test_duplicate_name_leaves_the_file_unchanged(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.json"
    _create(keys, "acme", capsys)
    before = keys.read_text()
    assert main(["keys", "create", "acme", "--keys-file", str(keys)]) == EXIT_USAGE
    assert keys.read_text() == before


def test_pipelines_accept_known_and_imported_steps(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.json"
    _create(keys, "a", capsys, "--pipelines", "gain,denoise")
    assert main(["keys", "create", "b", "--keys-file", str(keys), "--pipelines", "gian"]
                ) == EXIT_USAGE
    assert "'gian'" in capsys.readouterr().err
    # In a subprocess: an --import registers its processors for the rest of the process.
    imported = run_cli(["keys", "create", "c", "--keys-file", str(keys), "--pipelines",
                        "slowpass", "--import", "tests.integration.slow_processors"])
    assert imported.returncode == 0, imported.stderr
    assert main(["keys", "create", "d", "--keys-file", str(keys), "--pipelines", ""]
                ) == EXIT_USAGE


def test_list_of_an_empty_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": []}))
    assert main(["keys", "list", "--keys-file", str(keys)]) == 0
    assert "no keys" in capsys.readouterr().err
