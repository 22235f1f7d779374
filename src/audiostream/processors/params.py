"""Declared parameter schemas for processing steps, checked before a session starts.

A step's ``params`` are copied into every work message of the session and into
its resume token, so whatever a client puts there is multiplied by the chunk
rate on the broker. Each processing type therefore declares its parameters
(type, range or choices, default); anything else is refused with
``invalid_option`` (4008) when the pipeline is planned, before any reply queue,
work message or token exists. Only scalars are accepted, each value is capped at
``MAX_VALUE_BYTES`` and a step's params at ``MAX_STEP_BYTES`` (compact JSON),
so the largest legal pipeline is a few KiB whatever the client sends.

Refusal messages quote client input only in truncated form (``_show``): a
200 KB key must not come back as a 200 KB error.

``python -m audiostream.processors`` prints ``docs/steps.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from audiostream.errors import ConfigError, ErrorCode

if TYPE_CHECKING:
    from audiostream.processors.base import ProcessorRegistry

#: Largest value of one parameter, in bytes of compact JSON (strings: UTF-8 bytes + quotes).
MAX_VALUE_BYTES = 512
#: Largest ``params`` object of one step, in bytes of compact JSON.
MAX_STEP_BYTES = 1024
#: How much of a client-supplied key or value a refusal message quotes.
_QUOTE_CHARS = 40


class Kind(StrEnum):
    NUMBER = "number"
    """An int or a finite float (not a bool)."""
    INTEGER = "integer"
    """An int (not a bool, not 16000.0)."""
    STRING = "string"
    BOOLEAN = "boolean"


@dataclass(frozen=True, slots=True, kw_only=True)
class Param:
    """One declared parameter."""

    name: str
    kind: Kind
    description: str
    default: Any = None
    """What the step uses when the parameter is absent (documentation only: the
    validated params are passed on as the client sent them, nothing is added)."""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None

    def check(self, step: str, value: Any) -> None:
        """Raise ``ConfigError(INVALID_OPTION)`` unless ``value`` fits this parameter."""
        where = f"{step}: parameter {self.name!r}"
        if not _fits_kind(self.kind, value):
            raise _invalid(f"{where} must be {_article(self.kind)}, got {_type_of(value)}")
        if self.kind is Kind.STRING and _json_len(value) > MAX_VALUE_BYTES:
            raise _invalid(f"{where} is {_json_len(value)} bytes; the limit is "
                           f"{MAX_VALUE_BYTES}")
        if self.choices is not None and value not in self.choices:
            raise _invalid(f"{where} must be one of {_choices(self.choices)}, "
                           f"got {_show(value)}")
        if self.kind in (Kind.NUMBER, Kind.INTEGER):
            lo = -math.inf if self.minimum is None else self.minimum
            hi = math.inf if self.maximum is None else self.maximum
            if not lo <= value <= hi:
                raise _invalid(f"{where} must be in [{_num(lo)}, {_num(hi)}], "
                               f"got {_show(value)}")

    def describe(self) -> str:
        """The constraint in words, for docs/steps.md."""
        if self.choices is not None:
            return "one of " + _choices(self.choices)
        if self.kind in (Kind.NUMBER, Kind.INTEGER) and (
                self.minimum is not None or self.maximum is not None):
            lo = "-inf" if self.minimum is None else _num(self.minimum)
            hi = "inf" if self.maximum is None else _num(self.maximum)
            return f"[{lo}, {hi}]"
        return f"at most {MAX_VALUE_BYTES} bytes" if self.kind is Kind.STRING else "-"


CrossCheck = Callable[[Mapping[str, Any]], None]


@dataclass(frozen=True, slots=True)
class ParamSchema:
    """The parameters a step accepts; the empty schema accepts ``{}`` only."""

    params: tuple[Param, ...] = ()
    cross_check: CrossCheck | None = None
    """Rules between parameters (e.g. ``neg_threshold <= threshold``), run last."""

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names in {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def validate(self, step: str, raw: Any) -> dict[str, Any]:
        """The params to put in the work messages, or ``ConfigError(INVALID_OPTION)``.

        Cheap checks first (object, unknown keys, scalar types), so hostile input
        is refused before anything proportional to its size is done with it.
        """
        if not isinstance(raw, Mapping):
            raise _invalid(f"params of step {step!r} must be an object, got {_type_of(raw)}")
        declared = {p.name: p for p in self.params}
        unknown = [k for k in raw if k not in declared]
        if unknown:
            shown = ", ".join(_show(k) for k in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            allowed = ", ".join(self.names) or "none"
            raise _invalid(f"{step}: unknown parameter(s) {shown}{more}; allowed: {allowed}")
        out: dict[str, Any] = {}
        for key, value in raw.items():
            declared[key].check(step, value)
            out[key] = value
        size = _json_len(out)
        if size > MAX_STEP_BYTES:
            raise _invalid(f"{step}: params are {size} bytes; the limit is {MAX_STEP_BYTES}")
        if self.cross_check is not None:
            self.cross_check(out)
        return out


NO_PARAMS = ParamSchema()


def _fits_kind(kind: Kind, value: Any) -> bool:
    if isinstance(value, bool):
        return kind is Kind.BOOLEAN
    if kind is Kind.INTEGER:
        return isinstance(value, int)
    if kind is Kind.NUMBER:
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if kind is Kind.STRING:
        return isinstance(value, str)
    return False


def _json_len(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def _invalid(message: str) -> ConfigError:
    return ConfigError(message, ErrorCode.INVALID_OPTION)


def _article(kind: Kind) -> str:
    return f"an {kind}" if kind is Kind.INTEGER else f"a {kind}"


def _type_of(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return f"a non-finite number ({value})"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    """``repr`` of client input, cut to a length safe to send back and log."""
    text = repr(value) if isinstance(value, str | int | float | bool) else _type_of(value)
    if len(text) > _QUOTE_CHARS:
        return f"{text[:_QUOTE_CHARS]}... ({len(text)} characters)"
    return text


def _num(x: float) -> str:
    return f"{x:g}"


def _choices(choices: Iterable[Any]) -> str:
    return ", ".join(json.dumps(c) for c in choices)


# -- docs/steps.md ----------------------------------------------------------------------

def render_steps_doc(registry: ProcessorRegistry) -> str:
    """docs/steps.md: every step a client may request, with its parameters."""
    lines = [
        "# Processing steps and their parameters",
        "",
        "<!-- Generated from the declared schemas: "
        "`PYTHONPATH=src python -m audiostream.processors > docs/steps.md`. "
        "tests/policy/test_params.py fails when this file and the code disagree. -->",
        "",
        "A pipeline entry is a step name (`\"gain\"`) or an object "
        "(`{\"name\": \"gain\", \"params\": {\"db\": -6}}`). Parameters are checked when the "
        "session starts, before anything reaches the broker: an unknown parameter, a value "
        "of the wrong type or out of range, a non-finite number, a value over "
        f"{MAX_VALUE_BYTES} bytes or a step's params over {MAX_STEP_BYTES} bytes (compact "
        "JSON) closes the session with `invalid_option` (4008) and a message naming the "
        "step and parameter. Only scalars (numbers, strings, booleans) are accepted.",
        "",
    ]
    for name in registry.public_names():
        spec = registry.get(name)
        lines += [f"## `{name}`", "", spec.description or "-", ""]
        if spec.sample_rates:
            rates = ", ".join(str(r) for r in sorted(spec.sample_rates))
            lines += [f"Runs at {rates} Hz (other rates are resampled automatically).", ""]
        if not spec.params.params:
            lines += ["No parameters.", ""]
            continue
        lines += ["| parameter | type | allowed | default | meaning |",
                  "|---|---|---|---|---|"]
        for p in spec.params.params:
            default = "-" if p.default is None else f"`{json.dumps(p.default)}`"
            lines.append(f"| `{p.name}` | {p.kind} | {p.describe()} | {default} | "
                         f"{p.description} |")
        lines.append("")
    return "\n".join(lines)

