"""The SDK's exception tree: one class per way a session can fail, mirroring ``ErrorCode``.

Everything the SDK raises on purpose derives from ``ClientError`` (itself an
``AudioStreamError``, so ``except AudioStreamError`` keeps working)::

    ClientError
    ├── ServerRefused            the server said no (error message / close code 4xxx)
    │   ├── RequestError         4000-4009: the request was malformed or unsupported
    │   ├── AuthenticationError  4010-4019: key missing, wrong, or not allowed
    │   ├── LimitExceeded        4020-4029: rate, sessions, idle, slow consumer, flooding
    │   ├── ResumeError          4040-4049: the session could not be resumed / displaced
    │   └── ServiceUnavailable   4050-4099: draining, internal, broker, model, config
    ├── ConnectError             no session could be opened (raised after the retry budget)
    │   ├── ConnectionRefused    nothing listens at the address
    │   ├── DnsError             the host name does not resolve
    │   ├── TlsError             the certificate did not verify / the handshake failed
    │   ├── HandshakeError       the HTTP upgrade was refused (status code)
    │   └── ReadyTimeout         connected, but no ``ready`` arrived in time
    ├── ReconnectFailed          a running session's connection was lost for good
    ├── CallbackError            a callback raised and ``raise_callback_errors`` is on
    └── SessionClosed            ``send`` after ``finish`` or after the session ended

Connection failures are never reported as ``BROKER_UNAVAILABLE``: a wrong port, name
or certificate is the client's problem to fix, not the service's.
"""

from __future__ import annotations

from audiostream.errors import AudioStreamError, ErrorCode, TransportError


class ClientError(AudioStreamError):
    """Root of every error the SDK raises."""

    wire_code: int
    """The exact number the server sent (the close code or ``error.code``), which may be
    newer than this SDK's ``ErrorCode``; 0 when the error is local."""

    def __init__(self, message: str, code: ErrorCode | None = None, *,
                 wire_code: int | None = None) -> None:
        super().__init__(message, code)
        self.wire_code = wire_code if wire_code is not None else (
            int(code) if code is not None else 0)


class ServerRefused(ClientError):
    """The server ended or refused the session with a 4xxx code."""


class RequestError(ServerRefused):
    default_code = ErrorCode.PROTOCOL_ERROR


class AuthenticationError(ServerRefused):
    default_code = ErrorCode.AUTH_FAILED


class LimitExceeded(ServerRefused):
    default_code = ErrorCode.RATE_LIMITED


class ResumeError(ServerRefused):
    default_code = ErrorCode.RESUME_FAILED


class ServiceUnavailable(ServerRefused):
    default_code = ErrorCode.INTERNAL_ERROR


class ConnectError(ClientError):
    """No session could be opened; raised once the connect retry budget is spent."""

    default_code = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, *, url: str = "", attempts: int = 1) -> None:
        super().__init__(message)
        self.url = url
        self.attempts = attempts

    def __str__(self) -> str:
        return f"{type(self).__name__}: {self.message}"


class ConnectionRefused(ConnectError):
    pass


class DnsError(ConnectError):
    pass


class TlsError(ConnectError):
    pass


class HandshakeError(ConnectError):
    def __init__(self, message: str, *, url: str = "", attempts: int = 1,
                 status: int = 0) -> None:
        super().__init__(message, url=url, attempts=attempts)
        self.status = status


class ReadyTimeout(ConnectError):
    pass


class ReconnectFailed(ClientError, TransportError):
    """A session's connection dropped and every reconnection attempt failed."""

    default_code = ErrorCode.INTERNAL_ERROR


class CallbackError(ClientError):
    """A user callback raised and the client was asked to stop on that."""


class SessionClosed(ClientError):
    default_code = ErrorCode.UNEXPECTED_MESSAGE


#: Code ranges -> the class raised for codes without a more specific entry.
_RANGES: tuple[tuple[int, int, type[ServerRefused]], ...] = (
    (4000, 4010, RequestError),
    (4010, 4020, AuthenticationError),
    (4020, 4030, LimitExceeded),
    (4030, 4040, ServiceUnavailable),
    (4040, 4050, ResumeError),
    (4050, 4100, ServiceUnavailable),
)

#: Codes whose session a client may reopen (resume) on a new connection: the server was
#: going away, or the connection was closed for a reason that does not end the session.
RESUMABLE_CLOSES = frozenset({
    int(ErrorCode.SERVER_DRAINING), int(ErrorCode.INTERNAL_ERROR),
    int(ErrorCode.BROKER_UNAVAILABLE), int(ErrorCode.IDLE_TIMEOUT),
    4023,  # slow_consumer (v1.1): the session stays resumable
})


def code_of(value: int) -> ErrorCode | None:
    try:
        return ErrorCode(value)
    except ValueError:
        return None


def error_for(code: int, message: str) -> ServerRefused:
    """The exception for a server code (``error.code`` or a 4xxx close code)."""
    cls: type[ServerRefused] = ServiceUnavailable
    for low, high, kind in _RANGES:
        if low <= code < high:
            cls = kind
            break
    return cls(message, code_of(code) or cls.default_code, wire_code=code)
