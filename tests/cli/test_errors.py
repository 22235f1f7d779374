"""The CLI's error table: every user error is one line on stderr, a non-zero exit code, no
traceback, no secret. Each case runs the real CLI as a subprocess (``python -m audiostream``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from audiostream.cli import EXIT_BUG, EXIT_FAILURE, EXIT_USAGE, main
from audiostream.testing import sample_wav

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cretpw"


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    code: int
    says: str
    env: dict[str, str] = field(default_factory=dict)
    stdin: bytes = b""


def run_cli(argv: list[str], *, env: dict[str, str] | None = None, stdin: bytes = b"",
            cwd: Path = ROOT) -> subprocess.CompletedProcess[bytes]:
    """The real command line in a fresh process, with this checkout's sources first."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOSTREAM_")}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "audiostream", *argv], input=stdin,
                          capture_output=True, env=full_env, cwd=cwd, timeout=120, check=False)


def _files(tmp: Path) -> dict[str, str]:
    """Fixtures the table refers to as {name}."""
    keys = tmp / "keys.json"
    main(["keys", "create", "acme", "--keys-file", str(keys)])
    twins = tmp / "twins.json"
    twins.write_text(json.dumps({"keys": [
        {"id": "aaaaaaaaaaaa", "name": "twin", "sha256": "0" * 64},
        {"id": "bbbbbbbbbbbb", "name": "twin", "sha256": "1" * 64},
    ]}))
    (tmp / "corrupt.json").write_text("{not json")
    (tmp / "notes.txt").write_text("this is not audio\n" * 20)
    return {"keys": str(keys), "twins": str(twins), "corrupt": str(tmp / "corrupt.json"),
            "text": str(tmp / "notes.txt"), "wav": str(sample_wav()), "tmp": str(tmp),
            "missing": str(tmp / "missing.wav")}


OFFLINE = ["offline", "--pipeline", "highpass"]
STREAM = ["stream", "--url", "ws://127.0.0.1:1/v1/stream", "--api-key", "k", "--pipeline",
          "gain"]
BENCH = ["bench", "--url", "ws://127.0.0.1:1/v1/stream", "--duration", "1", "--pipeline",
         "gain"]
CASES = [
    # usage
    Case("unknown-command", ["teleport"], EXIT_USAGE, "invalid choice"),
    Case("keys-without-action", ["keys"], EXIT_USAGE, "required: ACTION"),
    Case("bad-option-value", ["keys", "create", "x", "--keys-file", "{keys}",
                              "--max-sessions", "0"], EXIT_USAGE, "must be >= 1"),
    Case("tls-cert-without-key", ["gateway", "--broker", "amqp://127.0.0.1:1/", "--keys-file",
                                  "{keys}", "--tls-cert", "{wav}"], EXIT_USAGE, "go together"),
    # environment: named, and only for the commands that use the variable
    Case("env-shards", ["topology", "definitions", "--out", "{tmp}/d.json"], EXIT_USAGE,
         "AUDIOSTREAM_SHARDS='two'", env={"AUDIOSTREAM_SHARDS": "two"}),
    Case("env-port", ["gateway", "--broker", "amqp://127.0.0.1:1/", "--keys-file", "{keys}"],
         EXIT_USAGE, "AUDIOSTREAM_PORT='http'", env={"AUDIOSTREAM_PORT": "http"}),
    Case("env-log-level", ["keys", "list", "--keys-file", "{keys}"], EXIT_USAGE,
         "AUDIOSTREAM_LOG_LEVEL='loud'", env={"AUDIOSTREAM_LOG_LEVEL": "loud"}),
    Case("env-json-logs", ["keys", "list", "--keys-file", "{keys}"], EXIT_USAGE,
         "AUDIOSTREAM_JSON_LOGS='maybe'", env={"AUDIOSTREAM_JSON_LOGS": "maybe"}),
    Case("env-device", ["worker", "--broker", "amqp://127.0.0.1:1/", "--processing", "gain"],
         EXIT_USAGE, "AUDIOSTREAM_DEVICE='tpu'", env={"AUDIOSTREAM_DEVICE": "tpu"}),
    Case("env-broker-malformed", ["topology", "declare"], EXIT_USAGE,
         "AUDIOSTREAM_BROKER=", env={"AUDIOSTREAM_BROKER": f"rabbit://u:{SECRET}@h/"}),
    Case("broker-not-amqp", ["topology", "declare", "--broker", "localhost"], EXIT_USAGE,
         "not an AMQP URL"),
    # input files and pipes
    Case("offline-missing-input", [*OFFLINE, "{missing}", "{tmp}/o.wav"], EXIT_USAGE,
         "does not exist"),
    Case("stream-missing-input", [*STREAM, "{missing}", "{tmp}/o.wav"], EXIT_USAGE,
         "does not exist"),
    Case("offline-not-audio", [*OFFLINE, "{text}", "{tmp}/o.wav"], EXIT_USAGE,
         "cannot read"),
    Case("stream-not-audio", [*STREAM, "{text}", "{tmp}/o.wav"], EXIT_USAGE,
         "cannot read notes.txt as audio"),
    Case("stream-unknown-output-format", [*STREAM, "{wav}", "{tmp}/o.mp3"], EXIT_USAGE,
         "use a .wav, .flac or .opus file name"),
    Case("offline-unknown-output-format", [*OFFLINE, "{wav}", "{tmp}/o.aiff"], EXIT_USAGE,
         "use a .wav, .flac or .opus file name"),
    Case("stream-bad-server-rate", [*STREAM, "{wav}", "{tmp}/o.wav", "--server-rate",
                                    "22050"], EXIT_USAGE, "not a rate the server takes"),
    Case("stream-stdin-empty", [*STREAM, "-", "{tmp}/o.wav"], EXIT_USAGE, "stdin is empty"),
    Case("offline-output-dir-missing", [*OFFLINE, "{wav}", "{tmp}/no/such/o.wav"], EXIT_USAGE,
         "does not exist"),
    Case("stdin-raw-without-format", [*OFFLINE, "-", "-"], EXIT_USAGE, "needs --format",
         stdin=b"\x01\x02" * 800),
    Case("stdin-empty", [*OFFLINE, "-", "{tmp}/o.wav"], EXIT_USAGE, "stdin is empty"),
    Case("format-malformed", [*OFFLINE, "-", "-", "--format", "sixteen"], EXIT_USAGE,
         "ENCODING:RATE"),
    Case("format-bad-rate", [*OFFLINE, "-", "-", "--format", "s16le:12345"], EXIT_USAGE,
         "sample_rate 12345", stdin=b"\0" * 640),
    Case("unknown-step", [*OFFLINE[:-1], "teleport", "{wav}", "{tmp}/o.wav"], EXIT_USAGE,
         "UNKNOWN_STEP"),
    # keys
    Case("keys-duplicate-name", ["keys", "create", "acme", "--keys-file", "{keys}"],
         EXIT_USAGE, "already exists"),
    Case("keys-revoke-ambiguous", ["keys", "revoke", "twin", "--keys-file", "{twins}"],
         EXIT_USAGE, "revoke one by its id"),
    Case("keys-revoke-unknown", ["keys", "revoke", "nobody", "--keys-file", "{keys}"],
         EXIT_USAGE, "no key with id or name 'nobody'"),
    Case("keys-unknown-step", ["keys", "create", "new", "--keys-file", "{keys}",
                               "--pipelines", "gain,teleport"], EXIT_USAGE, "'teleport'"),
    Case("keys-list-missing-file", ["keys", "list", "--keys-file", "{missing}"], EXIT_USAGE,
         "does not exist"),
    Case("keys-list-corrupt-file", ["keys", "list", "--keys-file", "{corrupt}"], EXIT_USAGE,
         "not valid JSON"),
    # runtime failures: exit 1, the password never printed
    Case("topology-broker-down", ["topology", "declare", "--broker",
                                  f"amqp://guest:{SECRET}@127.0.0.1:1/"], EXIT_FAILURE,
         "amqp://guest:***@127.0.0.1:1/: connection refused"),
    Case("healthcheck-refused", ["healthcheck", "--url", "ws://127.0.0.1:1/v1/stream",
                                 "--timeout", "2"], EXIT_FAILURE, "connection refused"),
    Case("healthcheck-not-ws", ["healthcheck", "--url", f"http://u:{SECRET}@h/"], EXIT_USAGE,
         "ws:// or wss://"),
    Case("bench-no-key", [*BENCH, "--sessions", "1"], EXIT_USAGE, "AUDIOSTREAM_API_KEY"),
    Case("bench-no-sessions", [*BENCH, "--sessions", "0", "--api-key", "k"], EXIT_USAGE,
         "sessions must be >= 1"),
    # a bug: exit 70 and the hint
    Case("bug-in-plugin", ["keys", "create", "p", "--keys-file", "{keys}", "--import",
                           "tests.cli.buggy_plugin"], EXIT_BUG, "run again with --debug"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_error_is_one_line_and_an_exit_code(case: Case, tmp_path: Path) -> None:
    files = _files(tmp_path)
    argv = [a.format(**files) for a in case.argv]
    run = run_cli(argv, env=case.env, stdin=case.stdin)
    err = run.stderr.decode()
    lines = [line for line in err.splitlines() if line.strip()]
    assert run.returncode == case.code, err
    assert len(lines) == 1, err
    assert case.says in lines[0], err
    assert "Traceback" not in err + run.stdout.decode(errors="replace")
    assert SECRET not in err + run.stdout.decode(errors="replace")


def test_the_table_covers_every_exit_code() -> None:
    assert {c.code for c in CASES} == {EXIT_USAGE, EXIT_FAILURE, EXIT_BUG}


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    run = run_cli(["--debug", "keys", "create", "p", "--keys-file", str(keys), "--import",
                   "tests.cli.buggy_plugin"])
    err = run.stderr.decode()
    assert run.returncode == EXIT_BUG
    assert "Traceback" in err and "a bug in a plugin" in err
    assert err.strip().splitlines()[-1].startswith("audiostream keys: error: internal error")


def test_version() -> None:
    from audiostream import __version__

    run = run_cli(["--version"])
    assert run.returncode == 0 and run.stdout.decode().strip() == f"audiostream {__version__}"


def test_a_bad_env_value_only_fails_the_commands_that_use_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    env = {"AUDIOSTREAM_SHARDS": "two"}
    created = run_cli(["keys", "create", "acme", "--keys-file", str(keys)], env=env)
    assert created.returncode == 0, created.stderr
    listed = run_cli(["keys", "list", "--keys-file", str(keys)], env=env)
    assert listed.returncode == 0 and "acme" in listed.stdout.decode()


#: Variables every command reads (logging and --debug): a bad one is a bad one everywhere.
COMMON_VARS = {"AUDIOSTREAM_LOG_LEVEL", "AUDIOSTREAM_JSON_LOGS", "AUDIOSTREAM_DEBUG"}


def test_no_command_parses_another_commands_env_while_building_the_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every AUDIOSTREAM_* name the CLI sources mention, set to nonsense: `keys list` works.

    Guards the pattern ``type=int, default=int(_env(...))``, which crashed every command."""
    import re

    src = ROOT / "src" / "audiostream"
    text = "".join(p.read_text() for p in (src / "cli.py", src / "bench.py"))
    names = {f"AUDIOSTREAM_{n}" for n in re.findall(r'_env(?:_default)?\("([A-Z_]+)"', text)}
    names |= set(re.findall(r'"(AUDIOSTREAM_[A-Z_]+)"', text))
    assert {"AUDIOSTREAM_SHARDS", "AUDIOSTREAM_PORT", "AUDIOSTREAM_BROKER"} <= names
    for name in names - COMMON_VARS:
        monkeypatch.setenv(name, "garbage")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": []}))
    assert main(["keys", "list", "--keys-file", str(keys)]) == 0, capsys.readouterr().err
