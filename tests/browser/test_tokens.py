"""Browser tokens: minted from an API key, scoped, short-lived, single use, Origin-checked."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from audiostream.errors import AuthError, ErrorCode
from audiostream.gateway.browser import MAX_TTL_S, PREFIX, BrowserTokens
from audiostream.gateway.keys import KeyStore, create_key
from audiostream.testing import Embedded
from tests.browser.conftest import ALLOWED_ORIGIN, mint

FMT = {"encoding": "pcm_s16le", "sample_rate": 16000, "channels": 1}


async def start(server: Embedded, credential: str, pipeline: list[Any],
                origin: str | None = None, version: int = 1) -> dict[str, Any]:
    """Open a session; return the first server message (ready or error)."""
    headers = {"Origin": origin} if origin else {}
    async with aiohttp.ClientSession() as http, http.ws_connect(server.url,
                                                                headers=headers) as ws:
        await ws.send_str(json.dumps({"type": "start", "version": version,
                                      "api_key": credential, "format": FMT,
                                      "pipeline": pipeline}))
        msg = await ws.receive(timeout=30)
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        first: dict[str, Any] = json.loads(msg.data)
        if first["type"] == "ready":
            await ws.send_bytes(b"\x00\x01" * 320)
            reply = await ws.receive(timeout=30)
            assert reply.type is aiohttp.WSMsgType.BINARY
        return first


async def test_token_opens_one_session_in_scope(server: Embedded) -> None:
    status, body = await mint(server, ["gain"], ttl_s=60)
    assert status == 200, body
    token = body["token"]
    assert token.startswith(PREFIX) and server.api_key not in token
    assert body["pipelines"] == ["gain"]
    assert (await start(server, token, ["gain"]))["type"] == "ready"
    # Single use: the same token cannot open a second session.
    again = await start(server, token, ["gain"])
    assert again["type"] == "error" and again["code"] == ErrorCode.AUTH_FAILED
    assert "already used" in again["message"]


async def test_pipeline_outside_the_scope_is_refused(server: Embedded) -> None:
    _, body = await mint(server, ["gain"])
    refused = await start(server, body["token"], ["gain", "highpass"])
    assert refused["type"] == "error" and refused["code"] == ErrorCode.FORBIDDEN
    assert "highpass" in refused["message"]


async def test_expired_token_is_refused(server: Embedded) -> None:
    keys = server.gateway.keys
    tokens = BrowserTokens(server.gateway.signer.secret, keys)
    parent = keys.verify(server.api_key)
    token, grant = tokens.mint(parent, ["gain"], ttl_s=30)
    # The same secret, 31 s later: the gateway's own verifier must say no.
    late = BrowserTokens(server.gateway.signer.secret, keys,
                         clock=lambda: grant.expires_at + 1)
    with pytest.raises(AuthError, match="expired"):
        late.verify(token)
    # And through the gateway: its own verifier, its clock moved past the expiry.
    status, body = await mint(server, ["gain"], ttl_s=30)
    assert status == 200
    live: BrowserTokens = keys.token_verifiers[PREFIX].__self__  # type: ignore[attr-defined]
    live.clock = lambda: body["expires_at"] + 1
    refused = await start(server, body["token"], ["gain"])
    assert refused["code"] == ErrorCode.AUTH_FAILED and "expired" in refused["message"]


async def test_expiry_is_at_most_ten_minutes(server: Embedded) -> None:
    status, body = await mint(server, ["gain"], ttl_s=MAX_TTL_S + 1)
    assert status == 400 and body["code"] == ErrorCode.INVALID_OPTION
    status, body = await mint(server, ["gain"])
    assert status == 200
    import time

    assert body["expires_at"] <= time.time() + MAX_TTL_S


async def test_tampered_or_foreign_tokens_are_refused(server: Embedded) -> None:
    _, body = await mint(server, ["gain"])
    head, payload, sig = body["token"].split(".")
    forged = f"{head}.{payload}.{sig[:-2]}AA"
    assert (await start(server, forged, ["gain"]))["code"] == ErrorCode.AUTH_FAILED
    other = BrowserTokens(b"another gateway's secret", server.gateway.keys)
    foreign, _ = other.mint(server.gateway.keys.verify(server.api_key), ["gain"])
    assert (await start(server, foreign, ["gain"]))["code"] == ErrorCode.AUTH_FAILED


async def test_minting_needs_a_valid_api_key(server: Embedded) -> None:
    status, body = await mint(server, ["gain"], key="as_nope_nope")
    assert status == 401 and body["code"] == ErrorCode.AUTH_FAILED
    async with aiohttp.ClientSession() as http, http.post(
            f"{server.http_url}/v1/tokens", json={"pipelines": ["gain"]}) as resp:
        assert resp.status == 401
    # A browser token cannot mint more tokens.
    _, good = await mint(server, ["gain"])
    status, body = await mint(server, ["gain"], key=good["token"])
    assert status == 403
    status, body = await mint(server, ["no-such-step"])
    assert status == 400 and "no-such-step" in body["message"]
    status, body = await mint(server, [])
    assert status == 400


async def test_scope_cannot_exceed_the_keys_own(tmp_path: Any) -> None:
    path = tmp_path / "keys.json"
    _, rec = create_key(path, "limited", pipelines=["gain"])
    tokens = BrowserTokens(b"s" * 32, KeyStore(path))
    with pytest.raises(AuthError, match="highpass") as err:
        tokens.mint(rec, ["gain", "highpass"])
    assert err.value.code is ErrorCode.FORBIDDEN
    token, _ = tokens.mint(rec, ["gain"])
    assert tokens.verify(token).pipelines == ("gain",)


async def test_revoking_the_key_kills_its_tokens(tmp_path: Any) -> None:
    from audiostream.gateway.keys import revoke_key

    path = tmp_path / "keys.json"
    _, rec = create_key(path, "shop")
    tokens = BrowserTokens(b"s" * 32, KeyStore(path))
    token, _ = tokens.mint(rec, ["gain"])
    revoke_key(path, "shop")
    with pytest.raises(AuthError, match="revoked") as err:
        tokens.verify(token)
    assert err.value.code is ErrorCode.FORBIDDEN


async def test_origin_allowlist_still_applies(server: Embedded) -> None:
    _, body = await mint(server, ["gain"])
    # A page on an origin that is not allowed cannot even open the WebSocket.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await http.ws_connect(server.url, headers={"Origin": "https://evil.example"})
        assert err.value.status == 403
    # ... and the token was not used up by the refused attempt.
    ready = await start(server, body["token"], ["gain"], origin=ALLOWED_ORIGIN)
    assert ready["type"] == "ready"
    # Minting from a disallowed origin is refused too.
    status, _ = await mint(server, ["gain"], headers={"Origin": "https://evil.example"})
    assert status == 403


async def test_no_api_key_reaches_the_page(server: Embedded) -> None:
    async with aiohttp.ClientSession() as http:
        for path in ("/demo", "/sdk/audiostream.js", "/sdk/audiostream-worklet.js"):
            async with http.get(f"{server.http_url}{path}") as resp:
                assert resp.status == 200
                text = await resp.text()
                assert server.api_key not in text
                assert "as_" not in text.replace("has_", "").replace("alias_", "")
        async with http.get(f"{server.http_url}/sdk/audiostream.js") as resp:
            assert resp.content_type == "text/javascript"


def test_cli_mints_a_token_the_gateway_accepts(tmp_path: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from audiostream.cli import main

    path = tmp_path / "keys.json"
    assert main(["keys", "create", "shop", "--keys-file", str(path)]) == 0
    capsys.readouterr()
    assert main(["keys", "token", "shop", "--pipelines", "gain,highpass", "--ttl", "120",
                 "--token-secret", "sekrit", "--keys-file", str(path)]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert token.startswith(PREFIX)
    record = KeyStore(path, token_verifiers={
        PREFIX: BrowserTokens(b"sekrit", KeyStore(path)).verify}).verify(token)
    assert record.name == "shop (browser token)"
    assert record.pipelines == ("gain", "highpass")
    # Too long a lifetime is refused with a clear message, not a traceback.
    assert main(["keys", "token", "shop", "--pipelines", "gain", "--ttl", "3600",
                 "--token-secret", "sekrit", "--keys-file", str(path)]) != 0
    assert "ttl_s must be" in capsys.readouterr().err
