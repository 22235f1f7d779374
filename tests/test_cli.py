"""The command line: keys, offline, topology, help, and refusing an exposed plain ws://."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audiostream.cli import build_parser, main
from audiostream.gateway import KeyStore
from audiostream.testing import sample_wav
from audiostream.topology import Topology
from tests.conftest import delete_prefixed, unique_prefix

COMMANDS = ["serve", "gateway", "worker", "stream", "offline", "healthcheck", "keys",
            "topology", "models", "bench"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    assert "usage: audiostream " + command in capsys.readouterr().out


def test_keys_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys.json"
    assert main(["keys", "create", "acme", "--keys-file", str(keys), "--max-sessions", "3",
                 "--pipelines", "gain,highpass"]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]  # the key is the last line
    assert key.startswith("as_") and key.split("_")[2] not in keys.read_text()
    record = KeyStore(keys).verify(key)
    assert record.max_sessions == 3 and record.pipelines == ("gain", "highpass")
    assert main(["keys", "list", "--keys-file", str(keys)]) == 0
    listed = capsys.readouterr().out
    assert "acme" in listed and "active" in listed and key not in listed
    assert main(["keys", "revoke", "acme", "--keys-file", str(keys)]) == 0
    assert main(["keys", "list", "--keys-file", str(keys)]) == 0
    assert "revoked" in capsys.readouterr().out


def test_offline_highpass_writes_a_filtered_file(tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    assert main(["offline", str(sample_wav()), str(out), "--pipeline", "highpass"]) == 0
    x, rate = soundfile.read(sample_wav(), dtype="int16")
    y, rate_out = soundfile.read(out, dtype="int16")
    assert rate == rate_out and y.shape == x.shape
    assert not np.array_equal(x, y)


def test_offline_reports_a_bad_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    assert main(["offline", str(sample_wav()), str(tmp_path / "o.wav"),
                 "--pipeline", "teleport"]) == 2
    assert "UNKNOWN_STEP" in capsys.readouterr().err


def test_plain_ws_on_a_public_address_is_refused_without_behind_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": []}))
    code = main(["gateway", "--broker", "amqp://127.0.0.1:1/", "--host", "0.0.0.0",
                 "--keys-file", str(keys)])
    assert code == 2 and "--behind-proxy" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "says"),
    [(["--bundle-max", "0"], "at least 1 item"), (["--bundle-wait-ms", "-1"], "wait >= 0"),
     (["--linger-ms", "-3"], "linger must be >= 0"),
     (["--coalesce-fraction", "-0.5"], "coalesce fraction must be >= 0")],
)
def test_bad_bundling_options_are_refused_with_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], says: str
) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": []}))
    code = main(["gateway", "--broker", "amqp://127.0.0.1:1/", "--keys-file", str(keys),
                 *flags])
    err = capsys.readouterr().err
    assert code == 2 and "CONFIG_ERROR" in err and says in err, err


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_pending_sockets_per_address_are_capped_by_default_unless_behind_a_proxy(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway that sees client addresses caps each one's sockets before their request
    (32, far above a normal client's handful); behind a proxy every client shares the
    proxy's address, so the cap stays off unless given."""
    from audiostream.cli import _gateway_settings

    parser = build_parser()
    base = [command, "--broker", "amqp://127.0.0.1:1/"]

    def cap(*flags: str) -> int | None:
        return _gateway_settings(parser.parse_args([*base, *flags])).edge.max_pending_per_ip

    assert cap() == 32
    assert cap("--behind-proxy") is None
    assert cap("--behind-proxy", "--max-pending-per-ip", "8") == 8
    assert cap("--max-pending-per-ip", "0") is None
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    assert "default 32" in " ".join(capsys.readouterr().out.split())


def test_the_work_message_byte_cap_is_a_gateway_option() -> None:
    """``--max-message-kib`` reaches the sessions' coalescing policy (an A/B knob for
    benchmarks/nonreader.py); the default is the policy's 256 KiB."""
    from audiostream.cli import _gateway_settings

    parser = build_parser()
    base = ["gateway", "--broker", "amqp://127.0.0.1:1/"]
    assert _gateway_settings(parser.parse_args(base)).max_message_bytes == 256 * 1024
    got = _gateway_settings(parser.parse_args([*base, "--max-message-kib", "2048"]))
    assert got.max_message_bytes == 2 * 1024 * 1024
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--max-message-kib", "0"])


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_session_starts_per_key_per_minute_is_a_gateway_option(command: str) -> None:
    """The cap on one key's new sessions (600 a minute) can be set or lifted: one key may
    legitimately start every call of a telephony bridge or a load test."""
    from audiostream.cli import _gateway_settings

    parser = build_parser()
    base = [command, "--broker", "amqp://127.0.0.1:1/"]

    def cap(*flags: str) -> int | None:
        return _gateway_settings(parser.parse_args([*base, *flags])).session_starts_per_minute

    assert cap() == 600
    assert cap("--session-starts-per-minute", "5000") == 5000
    assert cap("--session-starts-per-minute", "0") is None
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--session-starts-per-minute", "-1"])


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_shedding_new_sessions_is_a_gateway_option(command: str) -> None:
    from audiostream.cli import _gateway_settings

    parser = build_parser()
    base = [command, "--broker", "amqp://127.0.0.1:1/"]

    def limit(*flags: str) -> float:
        return float(_gateway_settings(parser.parse_args([*base, *flags])).shed_above_ms)

    assert limit() == 250.0
    assert limit("--shed-above-ms", "120") == 120.0
    assert limit("--shed-above-ms", "0") == 0.0
    for bad in ("-1", "nan", "soon"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--shed-above-ms", bad])


def test_denoise_state_is_a_worker_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from audiostream.cli import _resolve_env, _worker_settings

    parser = build_parser()
    base = ["worker", "--broker", "amqp://127.0.0.1:1/", "--processing", "denoise"]
    assert "denoise_state" not in _worker_settings(parser.parse_args(base), ["denoise"]).options
    got = _worker_settings(parser.parse_args([*base, "--denoise-state", "fp16"]), ["denoise"])
    assert got.options["denoise_state"] == "fp16"
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--denoise-state", "int8"])
    monkeypatch.setenv("AUDIOSTREAM_DENOISE_STATE", "FP16")  # what a Helm extraEnv sets
    args = build_parser().parse_args(base)
    _resolve_env(args)
    assert _worker_settings(args, ["denoise"]).options["denoise_state"] == "fp16"


@pytest.mark.rabbitmq
def test_topology_declare_is_idempotent(rabbitmq_url: str) -> None:
    prefix = unique_prefix()
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-m", "audiostream", "topology", "declare", "--broker", rabbitmq_url,
             "--prefix", prefix], capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 0, run.stderr
        assert "declared" in run.stdout
        assert "guest:guest" not in run.stdout and "guest:***@" in run.stdout
    import asyncio

    from audiostream.processors import registry
    asyncio.run(delete_prefixed(rabbitmq_url, Topology(
        processing_types=tuple(registry.names()), prefix=prefix)))
