"""audiostream.definitions agrees with Topology; the files in broker/ and workers/ are its
output."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest

from audiostream import definitions as defs
from audiostream.protocol import MAX_DEADLINE_MS
from audiostream.testing import default_topology
from audiostream.topology import Topology
from tests.deploy.chart import REPO

BROKER = REPO / "broker"
TYPES = ("passthrough", "gain", "highpass", "resample", "denoise", "vad")


def by_name(items: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(i["name"]): i for i in items}


@pytest.mark.parametrize("shards", [1, 2, 5])
@pytest.mark.parametrize("prefix", ["audiostream", "t0a1b2"])
def test_queues_and_arguments_are_the_topologys(shards: int, prefix: str) -> None:
    topo = Topology(processing_types=TYPES, prefix=prefix, shards=shards, delivery_limit=4,
                    reply_expires_ms=1500, dead_letter_max_length=77)
    d = defs.definitions(topo, vhost="v")
    queues = by_name(d["queues"])
    work = {topo.work_queue(p, s) for p in TYPES for s in range(shards)}
    assert set(queues) == work | {topo.dead_letter_queue}
    for name in work:
        q = queues[name]
        # Identical arguments: a gateway or worker redeclaring the queue is accepted.
        assert q["arguments"] == topo.work_queue_arguments()
        assert q["durable"] is True and q["auto_delete"] is False and q["vhost"] == "v"
    assert queues[topo.dead_letter_queue]["arguments"] == topo.dead_letter_queue_arguments()
    exchanges = by_name(d["exchanges"])
    assert set(exchanges) == {topo.exchange(p) for p in TYPES} | {topo.dead_letter_exchange}
    assert {e["type"] for e in exchanges.values()} == {"topic"}
    assert all(e["durable"] and not e["auto_delete"] for e in exchanges.values())
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in d["bindings"]}
    assert bindings == {
        (topo.exchange(p), topo.work_queue(p, s), topo.routing_key(p, s))
        for p in TYPES for s in range(shards)
    } | {(topo.dead_letter_exchange, topo.dead_letter_queue, "#")}
    assert d["vhosts"] == [{"name": "v"}]
    assert d["users"] == [] and d["permissions"] == []


def test_policies_match_exactly_the_queues_they_mean() -> None:
    topo = Topology(processing_types=TYPES, prefix="audiostream", shards=3)
    pols = by_name(defs.policies(topo))
    work = re.compile(str(pols["audiostream-work"]["pattern"]))
    reply = re.compile(str(pols["audiostream-reply"]["pattern"]))
    dead = re.compile(str(pols["audiostream-dead"]["pattern"]))
    for p in TYPES:
        for s in range(3):
            name = topo.work_queue(p, s)
            assert work.search(name) and not reply.search(name) and not dead.search(name)
    session = topo.reply_queue("3f1c9a")
    assert reply.search(session) and not work.search(session)
    assert dead.search(topo.dead_letter_queue) and not work.search(topo.dead_letter_queue)
    for other in ("audiostream.gain", "audiostream.gain.0.x", "other.gain.0",
                  "audiostreamXgain.0", "audiostream.unknown.0", "audiostream.dead.letter"):
        assert not work.search(other) and not dead.search(other), other
    # Same values as the arguments, so a policy never changes behaviour until edited.
    w = pols["audiostream-work"]["definition"]
    assert w == {"message-ttl": defs.DEFAULT_WORK_MESSAGE_TTL_MS,
                 "delivery-limit": topo.delivery_limit,
                 "dead-letter-exchange": topo.dead_letter_exchange}
    assert pols["audiostream-reply"]["definition"] == {"expires": topo.reply_expires_ms}
    assert pols["audiostream-dead"]["definition"] == {"max-length": topo.dead_letter_max_length,
                                                     "overflow": "drop-head"}
    assert {p["apply-to"] for p in pols.values()} == {"queues"}


def test_policy_ttl_never_cuts_a_valid_deadline() -> None:
    assert defs.DEFAULT_WORK_MESSAGE_TTL_MS >= MAX_DEADLINE_MS


def test_permissions_cover_the_prefix_and_the_default_exchange_only() -> None:
    topo = Topology(processing_types=TYPES, prefix="audiostream")
    perm = defs.permissions(topo, "app", vhost="/")
    configure, write, read = (re.compile(str(perm[k])) for k in ("configure", "write", "read"))
    own = [topo.work_queue("vad", 0), topo.exchange("vad"), topo.reply_queue("s1"),
           topo.dead_letter_exchange, topo.dead_letter_queue]
    for name in own:
        assert configure.match(name) and write.match(name) and read.match(name), name
    assert write.match("amq.default")  # replies go through the default exchange
    for foreign in ("orders", "amq.topic", "audiostreamX.vad.0", "x.audiostream.vad"):
        assert not configure.match(foreign) and not write.match(foreign), foreign
        assert not read.match(foreign), foreign


def test_user_definitions_and_password_hash() -> None:
    topo = default_topology()
    user = defs.BrokerUser(name="app", password_hash=defs.hash_password("pw", salt=b"salt"),
                           tags=("monitoring",))
    d = defs.definitions(topo, vhost="v", user=user)
    assert d["users"] == [{"name": "app", "password_hash": user.password_hash,
                           "hashing_algorithm": "rabbit_password_hashing_sha256",
                           "tags": ["monitoring"]}]
    assert d["permissions"] == [defs.permissions(topo, "app", vhost="v")]
    raw = base64.b64decode(user.password_hash)
    assert raw[:4] == b"salt" and raw[4:] == hashlib.sha256(b"salt" + b"pw").digest()
    assert defs.hash_password("pw") != defs.hash_password("pw")  # random salts
    with pytest.raises(ValueError):
        defs.hash_password("pw", salt=b"abc")


def test_broker_definitions_json_is_generated_from_the_code() -> None:
    """broker/definitions.json == `audiostream topology definitions` for the defaults."""
    topo = default_topology()
    assert set(topo.processing_types) == set(TYPES) and topo.shards == 2
    text = (BROKER / "definitions.json").read_text()
    assert text == defs.render(defs.definitions(topo)), (
        "regenerate: audiostream topology definitions --out broker/definitions.json")


def test_user_template_is_generated_from_the_code() -> None:
    text = (BROKER / "user-template.json").read_text()
    want = defs.user_definitions(default_topology(), defs.BrokerUser(name="audiostream"))
    assert text == defs.render(want)
    assert json.loads(text)["users"][0]["password_hash"] == ""  # no secret in git


def test_compose_definitions_are_generated_from_the_code() -> None:
    text = (REPO / "workers" / "compose" / "definitions.json").read_text()
    user = defs.BrokerUser(name="audiostream",
                           password_hash=defs.hash_password("audiostream", salt=b"dev0"),
                           tags=("administrator",))
    assert text == defs.render(defs.definitions(default_topology(), user=user))


def test_write_definitions(tmp_path: Path) -> None:
    topo = Topology(processing_types=("gain",), shards=1)
    out = defs.write_definitions(tmp_path / "sub" / "defs.json", topo, vhost="x")
    assert json.loads(out.read_text()) == defs.definitions(topo, vhost="x")


def test_cli_writes_the_same_file(tmp_path: Path) -> None:
    from audiostream.cli import main

    out = tmp_path / "defs.json"
    assert main(["topology", "definitions", "--out", str(out)]) == 0
    assert out.read_text() == (BROKER / "definitions.json").read_text()
