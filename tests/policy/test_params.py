"""Step params are checked against each step's declared schema (issue #13, hole 7).

Pure tests of ``processors/params.py`` and the planner, a property-based run of
over 10,000 hostile pipelines, and docs/steps.md kept equal to the schemas.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from audiostream.audio import AudioFormat, Encoding
from audiostream.errors import ConfigError, ErrorCode
from audiostream.processors import registry
from audiostream.processors.params import (
    MAX_STEP_BYTES,
    MAX_VALUE_BYTES,
    NO_PARAMS,
    Kind,
    Param,
    ParamSchema,
    render_steps_doc,
)
from audiostream.processors.pipeline import parse_steps, plan_raw

DOCS = Path(__file__).resolve().parents[2] / "docs" / "steps.md"
FMT = AudioFormat(Encoding.PCM_S16LE, 16000, 1)


def refused(raw: list[Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_steps(raw, registry)
    return info.value


def test_every_public_step_declares_its_params() -> None:
    declared = {n: registry.get(n).params.names for n in registry.names()}
    assert declared == {
        "denoise": ("variant",),
        "gain": ("db",),
        "highpass": ("cutoff_hz",),
        "passthrough": (),
        "resample": ("to",),
        "vad": ("threshold", "neg_threshold", "min_silence_ms"),
    }


def test_valid_params_pass_unchanged() -> None:
    steps = parse_steps([{"name": "gain", "params": {"db": -6}},
                         {"name": "vad", "params": {"threshold": 0.6}},
                         {"name": "denoise", "params": {"variant": "int8"}},
                         {"name": "highpass", "params": {}}, "passthrough"], registry)
    assert [dict(s.params) for s in steps] == [{"db": -6}, {"threshold": 0.6},
                                               {"variant": "int8"}, {}, {}]


@pytest.mark.parametrize("raw, words", [
    ([{"name": "passthrough", "params": {"x": 1}}], "unknown parameter(s) 'x'; allowed: none"),
    ([{"name": "gain", "params": {"db": 1, "dB": 2}}], "unknown parameter(s) 'dB'; allowed: db"),
    ([{"name": "gain", "params": {"db": "loud"}}], "'db' must be a number, got a string"),
    ([{"name": "gain", "params": {"db": True}}], "'db' must be a number, got a boolean"),
    ([{"name": "gain", "params": {"db": math.nan}}], "non-finite"),
    ([{"name": "gain", "params": {"db": math.inf}}], "non-finite"),
    ([{"name": "gain", "params": {"db": 41}}], "'db' must be in [-60, 40], got 41"),
    ([{"name": "gain", "params": {"db": [1]}}], "got an array"),
    ([{"name": "gain", "params": {"db": {"a": 1}}}], "got an object"),
    ([{"name": "gain", "params": [1, 2]}], "params of step 'gain' must be an object"),
    ([{"name": "denoise", "params": {"variant": "int4"}}], 'one of "fp32", "int8", "fp16"'),
    ([{"name": "vad", "params": {"threshold": 0.2, "neg_threshold": 0.5}}], "neg_threshold"),
    ([{"name": "gain", "params": {}, "junk": 1}], "unknown field(s) 'junk'"),
])
def test_bad_params_are_invalid_option(raw: list[Any], words: str) -> None:
    err = refused(raw)
    assert err.code is ErrorCode.INVALID_OPTION
    assert words in err.message


def test_a_200_kb_param_is_refused_without_echoing_it() -> None:
    big = "x" * 200_000
    for params in ({"variant": big}, {big: 1}, {"note": big}):
        err = refused([{"name": "denoise", "params": params}])
        assert err.code is ErrorCode.INVALID_OPTION
        assert len(err.message) < 300, err.message
    assert "200002 bytes; the limit is 512" in refused(
        [{"name": "denoise", "params": {"variant": big}}]).message


def test_size_caps() -> None:
    schema = ParamSchema(tuple(Param(name=f"p{i}", kind=Kind.STRING, description="")
                               for i in range(4)))
    at_value_cap = "v" * (MAX_VALUE_BYTES - 2)  # two quotes in JSON
    assert schema.validate("s", {"p0": at_value_cap}) == {"p0": at_value_cap}
    with pytest.raises(ConfigError, match="513 bytes; the limit is 512"):
        schema.validate("s", {"p0": at_value_cap + "v"})
    # Each value is legal, together they exceed the step cap.
    with pytest.raises(ConfigError, match=f"the limit is {MAX_STEP_BYTES}"):
        schema.validate("s", {f"p{i}": at_value_cap for i in range(3)})
    # Multi-byte characters count as bytes, not characters.
    with pytest.raises(ConfigError, match="bytes; the limit is 512"):
        schema.validate("s", {"p0": "é" * 300})


def test_integers_are_not_floats() -> None:
    schema = registry.get("resample").params
    assert schema.validate("resample", {"to": 8000}) == {"to": 8000}
    for bad in (8000.0, "8000", 8001, True):
        with pytest.raises(ConfigError):
            schema.validate("resample", {"to": bad})


def test_the_empty_schema_is_the_default() -> None:
    assert NO_PARAMS.validate("x", {}) == {}
    with pytest.raises(ConfigError):
        NO_PARAMS.validate("x", {"a": 1})


def test_docs_steps_md_matches_the_schemas() -> None:
    assert DOCS.read_text() == render_steps_doc(registry), (
        "docs/steps.md is stale: PYTHONPATH=src python -m audiostream.processors "
        "> docs/steps.md")


# -- property-based: >= 10,000 hostile pipelines, bounded in time, no crash ------------

STEP_NAMES = [*registry.names(), "nope", "", "x" * 100]
KEYS = sorted({k for n in registry.names() for k in registry.get(n).params.names})

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(-100, 100_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-100, 20_000),
    st.sampled_from(["fp32", "int8", "fp16", "int4", "", "x" * 600]),
    st.text(max_size=30),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8)
param_maps = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)),
                             json_values, max_size=5)
entries = st.one_of(
    st.sampled_from(STEP_NAMES),
    st.fixed_dictionaries({"name": st.sampled_from(STEP_NAMES)},
                          optional={"params": st.one_of(param_maps, json_values)}),
    st.fixed_dictionaries({"name": st.sampled_from(STEP_NAMES), "params": param_maps}),
    json_values,
)

FUZZ_CASES = 10_000

@pytest.mark.timeout(900)  # the time bound of the run
def test_fuzz_param_validation_never_crashes() -> None:
    seen = {"cases": 0, "accepted": 0}
    started = time.monotonic()

    @settings(max_examples=FUZZ_CASES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(entries, min_size=1, max_size=4))
    def one(raw: list[Any]) -> None:
        seen["cases"] += 1
        try:
            planned = plan_raw(raw, FMT, registry)
        except ConfigError as err:
            assert err.code in (ErrorCode.INVALID_OPTION, ErrorCode.UNKNOWN_STEP,
                                ErrorCode.UNSUPPORTED_FORMAT), err
            assert len(err.message) < 600, err.message
            return
        seen["accepted"] += 1
        for step in planned:
            declared = registry.get(step.name).params.names
            assert set(step.params) <= set(declared)
            assert len(json.dumps(dict(step.params), separators=(",", ":"))) <= MAX_STEP_BYTES

    one()
    elapsed = time.monotonic() - started
    assert seen["cases"] >= FUZZ_CASES, seen
    assert seen["accepted"] > 0, seen  # the generator reaches valid pipelines too
    print(f"param fuzz: {seen['cases']} cases, {seen['accepted']} accepted, {elapsed:.1f} s")


# -- the same inputs over real sockets: no crash, no 5xx, no leaked task ---------------

LIVE_CASES = 300


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_hostile_params_over_a_live_gateway() -> None:
    import asyncio

    import aiohttp

    from audiostream.gateway import GatewaySettings
    from audiostream.protocol import start_json
    from audiostream.testing import ThreadedServer

    codes: dict[str, int] = {}
    gw_settings = GatewaySettings(chunk_rate=None, broker_probe_s=0)
    with ThreadedServer(processing=("passthrough", "gain"),
                        gateway_settings=gw_settings) as live:
        srv = live.server

        async def tasks_now() -> int:
            return len(asyncio.all_tasks())

        baseline = live.run(tasks_now())

        async def try_start(pipeline: list[Any]) -> str:
            async with aiohttp.ClientSession() as http, http.ws_connect(srv.url) as ws:
                await ws.send_str(start_json(srv.api_key, FMT, pipeline))
                msg = await ws.receive(timeout=20)
                assert msg.type is aiohttp.WSMsgType.TEXT, msg
                reply = json.loads(msg.data)
                if reply["type"] == "ready":
                    return "ready"
                assert reply["type"] == "error", reply
                return str(reply["name"])

        @settings(max_examples=LIVE_CASES, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))
        @given(st.lists(entries, min_size=1, max_size=3))
        def one(raw: list[Any]) -> None:
            name = live.run(try_start(raw))
            assert name in ("ready", "invalid_option", "unknown_step", "unsupported_format")
            codes[name] = codes.get(name, 0) + 1

        one()

        async def settled() -> tuple[int, int]:
            for _ in range(300):
                if not srv.gateway.connections:
                    break
                await asyncio.sleep(0.02)  # connections wind down after their clients left
            return len(srv.gateway.connections), len(asyncio.all_tasks())

        connections, tasks = live.run(settled())

        async def health() -> int:
            async with aiohttp.ClientSession() as http, \
                    http.get(f"{srv.ops_url}/healthz") as r:
                return r.status

        assert live.run(health()) == 200
    assert connections == 0 and tasks <= baseline, (connections, tasks, baseline)
    assert sum(codes.values()) >= LIVE_CASES and codes.get("invalid_option"), codes
    print(f"live param fuzz: {codes}")
