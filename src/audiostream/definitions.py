"""RabbitMQ definitions (the JSON ``rabbitmqctl import_definitions`` reads), from ``Topology``.

``broker/definitions.json``, the Helm chart's Messaging Topology Operator
resources and ``audiostream topology declare`` all describe one layout, and
all of it comes from ``audiostream.topology``: queue *arguments* here are
exactly ``Topology.work_queue_arguments()`` and friends, so a gateway or worker
that redeclares a queue imported from these definitions sends equivalent
arguments and never gets ``PRECONDITION_FAILED``.

Policies only add what arguments cannot: they are editable at runtime. For the
keys set both ways, RabbitMQ 3.10 resolves the conflict per key: the *lower*
of argument and policy wins for ``delivery-limit``, ``message-ttl``,
``expires`` and ``max-length``; the *argument* wins for
``dead-letter-exchange``. So a policy can tighten a running system (lower the
delivery limit, cap the TTL) but never loosen what the queue was declared with;
the policies below repeat the argument values so that nothing changes unless an
operator edits them.

Pure: no I/O except ``write_definitions``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audiostream.topology import Topology

#: Exchange types, as ``RabbitTransport.declare`` declares them (durable topic exchanges):
#: work exchanges route ``<type>.<shard>``; the dead-letter exchange sends every dead
#: letter (which keeps its original routing key) to the one dead-letter queue via ``#``.
WORK_EXCHANGE_TYPE = "topic"
DEAD_LETTER_EXCHANGE_TYPE = "topic"
DEAD_LETTER_ROUTING_KEY = "#"

#: Upper bound on a work message's life (ms), applied by policy. Gateways set a
#: per-message TTL equal to the chunk deadline (at most ``protocol.MAX_DEADLINE_MS``);
#: this only catches a publisher that forgot to.
DEFAULT_WORK_MESSAGE_TTL_MS = 30_000

POLICY_PRIORITY = 10
PASSWORD_HASHING_ALGORITHM = "rabbit_password_hashing_sha256"


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerUser:
    """The application's broker user for the definitions' ``users``/``permissions``.

    ``password_hash`` is RabbitMQ's salted SHA-256 (see ``hash_password``); leave it
    empty to create a user without a password and set one with
    ``rabbitmqctl change_password``.
    """

    name: str
    password_hash: str = ""
    tags: tuple[str, ...] = ()


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    if len(salt) != 4:
        raise ValueError("RabbitMQ password salts are 4 bytes")
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


def _name_pattern(topology: Topology) -> str:
    return f"^{re.escape(topology.prefix)}\\."


def work_queue_pattern(topology: Topology) -> str:
    """Regex matching exactly the work queues (``<prefix>.<type>.<shard>``)."""
    types = "|".join(re.escape(t) for t in topology.processing_types)
    return f"^{re.escape(topology.prefix)}\\.({types})\\.[0-9]+$"


def reply_queue_pattern(topology: Topology) -> str:
    return f"^{re.escape(topology.reply_queue(''))}"


def dead_letter_queue_pattern(topology: Topology) -> str:
    return f"^{re.escape(topology.dead_letter_queue)}$"


def policies(
    topology: Topology,
    *,
    vhost: str = "/",
    work_message_ttl_ms: int = DEFAULT_WORK_MESSAGE_TTL_MS,
) -> list[dict[str, Any]]:
    """TTL, delivery limit and dead-lettering as policies (same values as the arguments)."""
    base = f"{topology.prefix}"
    return [
        {
            "vhost": vhost,
            "name": f"{base}-work",
            "pattern": work_queue_pattern(topology),
            "apply-to": "queues",
            "priority": POLICY_PRIORITY,
            "definition": {
                "message-ttl": work_message_ttl_ms,
                "delivery-limit": topology.delivery_limit,
                "dead-letter-exchange": topology.dead_letter_exchange,
            },
        },
        {
            "vhost": vhost,
            "name": f"{base}-reply",
            "pattern": reply_queue_pattern(topology),
            "apply-to": "queues",
            "priority": POLICY_PRIORITY,
            "definition": {"expires": topology.reply_expires_ms},
        },
        {
            "vhost": vhost,
            "name": f"{base}-dead",
            "pattern": dead_letter_queue_pattern(topology),
            "apply-to": "queues",
            "priority": POLICY_PRIORITY,
            "definition": {
                "max-length": topology.dead_letter_max_length,
                "overflow": "drop-head",
            },
        },
    ]


def permissions(topology: Topology, user: str, *, vhost: str = "/") -> dict[str, Any]:
    """Least privilege for gateways and workers: only ``<prefix>.*`` resources.

    ``configure``: declare work/reply/dead-letter queues and exchanges;
    ``write``: publish to the work exchanges, bind queues, and publish replies through
    the default exchange (checked as ``amq.default``);
    ``read``: consume queues and bind from the work exchanges.
    """
    own = f"{_name_pattern(topology)}.*"
    return {
        "user": user,
        "vhost": vhost,
        "configure": own,
        "write": f"^({re.escape(topology.prefix)}\\..*|amq\\.default)$",
        "read": own,
    }


def user_definitions(
    topology: Topology, user: BrokerUser, *, vhost: str = "/"
) -> dict[str, list[dict[str, Any]]]:
    """The ``users`` and ``permissions`` sections for the application user."""
    return {
        "users": [
            {
                "name": user.name,
                "password_hash": user.password_hash,
                "hashing_algorithm": PASSWORD_HASHING_ALGORITHM,
                "tags": list(user.tags),
            }
        ],
        "permissions": [permissions(topology, user.name, vhost=vhost)],
    }


def definitions(
    topology: Topology,
    *,
    vhost: str = "/",
    user: BrokerUser | None = None,
    work_message_ttl_ms: int = DEFAULT_WORK_MESSAGE_TTL_MS,
) -> dict[str, Any]:
    """Definitions JSON (as a dict) for ``topology`` in ``vhost``.

    Exchanges, work queues, the dead-letter path, their bindings and the policies;
    with ``user``, also the application user and its permissions. Reply queues are
    per session and declared by gateways at run time, so only their policy is here.
    """
    exchanges: list[dict[str, Any]] = []
    queues: list[dict[str, Any]] = []
    bindings: list[dict[str, Any]] = []
    for ptype in topology.processing_types:
        exchanges.append(_exchange(topology.exchange(ptype), WORK_EXCHANGE_TYPE, vhost))
        for shard in range(topology.shards):
            queue = topology.work_queue(ptype, shard)
            queues.append(_queue(queue, topology.work_queue_arguments(), vhost))
            bindings.append(
                _binding(topology.exchange(ptype), queue, topology.routing_key(ptype, shard), vhost)
            )
    exchanges.append(
        _exchange(topology.dead_letter_exchange, DEAD_LETTER_EXCHANGE_TYPE, vhost)
    )
    queues.append(
        _queue(topology.dead_letter_queue, topology.dead_letter_queue_arguments(), vhost)
    )
    bindings.append(
        _binding(
            topology.dead_letter_exchange,
            topology.dead_letter_queue,
            DEAD_LETTER_ROUTING_KEY,
            vhost,
        )
    )
    users: dict[str, list[dict[str, Any]]] = {"users": [], "permissions": []}
    if user is not None:
        users = user_definitions(topology, user, vhost=vhost)
    return {
        "users": users["users"],
        "vhosts": [{"name": vhost}],
        "permissions": users["permissions"],
        "parameters": [],
        "global_parameters": [],
        "policies": policies(topology, vhost=vhost, work_message_ttl_ms=work_message_ttl_ms),
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    }


def render(defs: dict[str, Any]) -> str:
    """Stable JSON text (sorted keys, two-space indent, final newline)."""
    return json.dumps(defs, indent=2, sort_keys=True) + "\n"


def write_definitions(
    path: str | os.PathLike[str],
    topology: Topology,
    *,
    vhost: str = "/",
    user: BrokerUser | None = None,
) -> Path:
    """Write ``definitions(topology)`` to ``path`` (``audiostream topology definitions``)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(definitions(topology, vhost=vhost, user=user)))
    return out


def _exchange(name: str, kind: str, vhost: str) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": vhost,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": {},
    }


def _queue(name: str, arguments: dict[str, Any], vhost: str) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": vhost,
        "durable": True,
        "auto_delete": False,
        "arguments": dict(arguments),
    }


def _binding(source: str, queue: str, routing_key: str, vhost: str) -> dict[str, Any]:
    return {
        "source": source,
        "vhost": vhost,
        "destination": queue,
        "destination_type": "queue",
        "routing_key": routing_key,
        "arguments": {},
    }
