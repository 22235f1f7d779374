"""One exception root and one table of error codes for the whole system.

``ErrorCode`` values double as WebSocket close codes (4000-4999) and as the
``code`` field of JSON ``error`` and ``notice`` messages, so a client sees the
same number whether the server closes the connection or only reports a problem.

Exception tree::

    AudioStreamError
    ├── ProtocolError      the peer broke protocol v1 (local validation)
    ├── AuthError          credentials missing, wrong or not allowed
    ├── LimitError         a configured limit was exceeded
    ├── ProcessingError    a processing step failed or its input was unusable
    ├── ConfigError        bad configuration, pipeline or format
    ├── ModelError         a model file is missing, altered or unusable
    └── TransportError     the broker (or in-memory transport) failed; retryable
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Error codes; each is also a valid WebSocket close code."""

    # Protocol: the client sent something it must not.
    PROTOCOL_ERROR = 4000
    INVALID_JSON = 4001
    UNEXPECTED_MESSAGE = 4002
    INVALID_AUDIO = 4003
    FRAME_TOO_LARGE = 4004
    UNSUPPORTED_FORMAT = 4005
    UNKNOWN_STEP = 4006
    UNSUPPORTED_VERSION = 4007
    INVALID_OPTION = 4008
    # Authentication and authorisation.
    AUTH_FAILED = 4010
    AUTH_TIMEOUT = 4011
    CREDENTIALS_IN_URL = 4012
    FORBIDDEN = 4013
    KEY_REVOKED = 4014
    # Limits.
    RATE_LIMITED = 4020
    TOO_MANY_SESSIONS = 4021
    IDLE_TIMEOUT = 4022
    SLOW_CONSUMER = 4023
    CREDIT_EXCEEDED = 4024
    FLOODING = 4025
    # Per-chunk outcomes without audio.
    EXPIRED = 4030
    OVERLOADED = 4031
    PROCESSING_FAILED = 4032
    # Resumption.
    RESUME_FAILED = 4040
    DISPLACED = 4041
    # Server side.
    SERVER_DRAINING = 4050
    INTERNAL_ERROR = 4090
    BROKER_UNAVAILABLE = 4091
    MODEL_ERROR = 4092
    CONFIG_ERROR = 4093


#: Codes after which the client may retry the same request unchanged.
RETRYABLE_CODES = frozenset(
    {
        ErrorCode.EXPIRED,
        ErrorCode.OVERLOADED,
        ErrorCode.RATE_LIMITED,
        ErrorCode.SLOW_CONSUMER,
        ErrorCode.CREDIT_EXCEEDED,
        ErrorCode.TOO_MANY_SESSIONS,
        ErrorCode.SERVER_DRAINING,
        ErrorCode.BROKER_UNAVAILABLE,
        ErrorCode.INTERNAL_ERROR,
    }
)


class AudioStreamError(Exception):
    """Root of every error audiostream raises on purpose."""

    default_code: ErrorCode = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed if sent again later."""
        return self.code in RETRYABLE_CODES

    def __str__(self) -> str:
        return f"{self.code.name} ({int(self.code)}): {self.message}"


class ProtocolError(AudioStreamError):
    default_code = ErrorCode.PROTOCOL_ERROR


class AuthError(AudioStreamError):
    default_code = ErrorCode.AUTH_FAILED


class LimitError(AudioStreamError):
    default_code = ErrorCode.RATE_LIMITED


class ProcessingError(AudioStreamError):
    default_code = ErrorCode.PROCESSING_FAILED


class ConfigError(AudioStreamError):
    default_code = ErrorCode.CONFIG_ERROR


class ModelError(AudioStreamError):
    default_code = ErrorCode.MODEL_ERROR


class TransportError(AudioStreamError):
    default_code = ErrorCode.BROKER_UNAVAILABLE
