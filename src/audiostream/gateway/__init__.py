"""Gateway: terminates client WebSockets and talks to the broker."""

from audiostream.gateway.keys import KeyRecord, KeyStore, create_key, revoke_key
from audiostream.gateway.server import Gateway, GatewaySettings, server_ssl_context, start_site

__all__ = [
    "Gateway",
    "GatewaySettings",
    "KeyRecord",
    "KeyStore",
    "create_key",
    "revoke_key",
    "server_ssl_context",
    "start_site",
]
