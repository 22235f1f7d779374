"""Hole 12, "Python internals leak in ``invalid_json`` messages", against a live gateway:
a text frame that is not JSON, or JSON of the wrong shape, before and after ``start``,
gets its documented code and a message in the protocol's words. No Python type name,
repr or exception text reaches the client (``{"type": null}`` used to be answered
"unknown message type 'NoneType'")."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from audiostream.errors import ErrorCode
from audiostream.protocol import start_json
from tests.gateway.conftest import TLS, expect_close, read_json
from tests.security.conftest import FMT, EdgeServer

pytestmark = pytest.mark.integration
CHUNK = b"\x01\x00" * 320
#: Words that only Python would put in a message.
PYTHON = re.compile(r"\b(NoneType|int|float|str|list|dict|bool|tuple|bytes|None|True|False|"
                    r"JSONDecodeError|ValueError|TypeError|KeyError|Traceback|Expecting)\b")


def assert_clear(err: dict[str, object], code: ErrorCode) -> None:
    assert err["type"] == "error" and err["code"] == code, err
    message = str(err["message"])
    assert message and not PYTHON.search(message), message


# (frame, code) pairs refused before ``start``: each closes the connection.
BEFORE_START = [
    ("{nope", ErrorCode.INVALID_JSON),
    ('{"type": "start", "api_key": "k"', ErrorCode.INVALID_JSON),
    ("[1, 2]", ErrorCode.PROTOCOL_ERROR),
    ('{"type": null}', ErrorCode.UNEXPECTED_MESSAGE),
    ('{"type": 7}', ErrorCode.UNEXPECTED_MESSAGE),
    ('{"type": ["start"]}', ErrorCode.UNEXPECTED_MESSAGE),
    (json.dumps({"type": "start", "api_key": "k", "pipeline": ["passthrough"],
                 "format": {"encoding": [True], "sample_rate": 16000}}),
     ErrorCode.UNSUPPORTED_FORMAT),
]


@pytest.mark.parametrize(("frame", "code"), BEFORE_START)
async def test_bad_text_before_start_gets_a_clear_code(
    edge_server: EdgeServer, tls: TLS, frame: str, code: ErrorCode
) -> None:
    async with edge_server() as srv, aiohttp.ClientSession() as http, \
            http.ws_connect(srv.url, ssl=tls.client) as ws:
        await ws.send_str(frame)
        assert_clear(await read_json(ws), code)
        await expect_close(ws, code)


async def test_bad_text_after_start_gets_a_clear_code_and_the_session_goes_on(
    edge_server: EdgeServer, tls: TLS
) -> None:
    async with edge_server() as srv, aiohttp.ClientSession() as http, \
            http.ws_connect(srv.url, ssl=tls.client) as ws:
        assert srv.api_key is not None
        await ws.send_str(start_json(srv.api_key, FMT, ["passthrough"]))
        assert (await read_json(ws))["type"] == "ready"
        for frame, code in [("{nope", ErrorCode.INVALID_JSON),
                            ('{"type": null}', ErrorCode.UNEXPECTED_MESSAGE),
                            ('{"type": 7.5}', ErrorCode.UNEXPECTED_MESSAGE),
                            ('"stop"', ErrorCode.PROTOCOL_ERROR)]:
            await ws.send_str(frame)
            assert_clear(await read_json(ws), code)
        await ws.send_bytes(CHUNK)  # the session is intact
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.BINARY and msg.data == CHUNK
        await ws.send_str('{"type": "stop"}')
        assert (await read_json(ws))["type"] == "summary"
        await expect_close(ws, 1000)
