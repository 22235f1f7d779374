"""Call tokens and Twilio signatures with plain values."""

from __future__ import annotations

import pytest

from audiostream.errors import AuthError, ConfigError
from audiostream.gateway.keys import KeyRecord
from audiostream.gateway.telephony import (
    MAX_TOKEN_TTL_S,
    mint_call_token,
    twilio_signature,
    verify_call_token,
)

SECRET = b"s" * 32
KEY = KeyRecord("abc123", "pbx", "0" * 64, 0.0, pipelines=("denoise", "vad"))


def test_token_round_trip_and_scope() -> None:
    token = mint_call_token(SECRET, KEY, ttl_s=60, pipelines=("denoise", "gain"), now=1000.0)
    grant = verify_call_token(SECRET, token, now=1030.0)
    assert grant.key_id == "abc123"
    assert grant.pipelines == ("denoise",)  # never more than the key may use
    assert grant.expires_at == 1060.0


def test_token_expiry_tampering_and_lifetime_bound() -> None:
    token = mint_call_token(SECRET, KEY, ttl_s=60, now=1000.0)
    with pytest.raises(AuthError, match="expired"):
        verify_call_token(SECRET, token, now=1061.0)
    with pytest.raises(AuthError, match="invalid"):
        verify_call_token(b"x" * 32, token, now=1000.0)
    body, sig = token.split(".")[1:]
    with pytest.raises(AuthError):
        verify_call_token(SECRET, f"ct1.{body}x.{sig}", now=1000.0)
    with pytest.raises(ConfigError):
        mint_call_token(SECRET, KEY, ttl_s=MAX_TOKEN_TTL_S + 1)


def test_twilio_signature_matches_the_documented_algorithm() -> None:
    # HMAC-SHA1(auth token, URL + sorted POST params), base64: the example vector of
    # Twilio's request-validation docs (and twilio-node's tests).
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675309",
              "Digits": "1234", "From": "+14158675309", "To": "+18005551212"}
    assert twilio_signature("12345", url, params) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
