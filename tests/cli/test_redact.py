"""Secrets never reach a terminal: URL passwords, credential query parameters, API keys."""

from __future__ import annotations

import pytest

from audiostream.redact import redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
     ("amqps://u:p%40ss:w@host/vh", "amqps://u:***@host/vh"),
     ("amqp://127.0.0.1:5672/", "amqp://127.0.0.1:5672/"),
     ("amqp://user@host/", "amqp://user@host/"),
     ("wss://gw/v1/stream?api_key=as_0123456789ab_Secret-value&x=1",
      "wss://gw/v1/stream?api_key=***&x=1")],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_text_finds_secrets_inside_messages() -> None:
    text = ("cannot connect to amqp://admin:hunter2@rabbit:5672/ with key "
            "as_0123456789ab_AbCdEfGhIjKlMnOp and ws://h/?token=xyz")
    out = redact_text(text)
    assert "hunter2" not in out and "AbCdEfGhIjKlMnOp" not in out and "xyz" not in out
    assert "amqp://admin:***@rabbit:5672/" in out and "as_0123456789ab_***" in out
