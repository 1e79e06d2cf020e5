# SPDX-License-Identifier: MIT
"""Fingerprints and key layout: no raw identity in a key, one hash tag per tenant."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
import redis

from tests.conftest import SECRET, T0
from throttle import ConfigurationError, IdentityError, Keyspace, Limit, RedisStore

RAW_KEY = "sk-live-THIS-IS-A-SECRET-KEY"
RAW_AGENT = "agent-007-raw"


def test_no_raw_identity_in_any_key(redis_client: redis.Redis) -> None:
    """After admissions, bookings and windows, KEYS * shows fingerprints only."""
    store = RedisStore(redis_client, Keyspace(SECRET))
    limits = [
        Limit("req", "1/s", burst=1),
        Limit("agent", "1/s", burst=1, per=["api_key", "agent_id"]),
        Limit("win", "1/s", algorithm="sliding_window", per=["api_key", "tier"]),
        Limit("global", "100/s", per=[]),
    ]
    identity = {"api_key": RAW_KEY, "agent_id": RAW_AGENT, "tier": "gold"}
    for _ in range(3):
        store.admit(limits, identity, reserve=True, now_us=T0)
    keys = [k.decode() for k in redis_client.keys("*")]
    assert any(":~b:" in k for k in keys), keys  # a booking was written too
    for key in keys:
        for raw in (RAW_KEY, RAW_AGENT, "gold", "sk-live"):
            assert raw not in key
    values = [redis_client.dump(k) or b"" for k in keys]
    assert not any(RAW_KEY.encode() in v or RAW_AGENT.encode() in v for v in values)


def test_tenant_keys_share_one_hash_tag(keyspace: Keyspace) -> None:
    """Every bucket of one API key carries the same hash tag; a global limit has its own."""
    identity = {"api_key": "k", "agent_id": "a", "tier": "t"}
    tenant = [
        keyspace.bucket(Limit("a", "1/s"), identity),
        keyspace.bucket(Limit("b", "1/s", per=["api_key", "agent_id"]), identity),
        keyspace.bucket(Limit("c", "1/s", per=["api_key", "tier"]), identity),
    ]
    assert len({b.tag for b in tenant}) == 1
    assert all(b.key.startswith(f"t:{b.tag}:") for b in tenant)
    glob = keyspace.bucket(Limit("g", "1/s", per=[]), identity)
    assert glob.tag == "{g}"
    assert glob.key == "t:{g}"


def test_fingerprints_are_keyed_and_distinct() -> None:
    """The fingerprint depends on the secret, the dimension, the value and its type."""
    a = Keyspace(SECRET)
    b = Keyspace(SECRET + "other")
    assert a.fingerprint("api_key", "k") != b.fingerprint("api_key", "k")
    assert a.fingerprint("api_key", "k") != a.fingerprint("agent_id", "k")
    assert a.fingerprint("api_key", "7") != a.fingerprint("api_key", 7)
    assert a.fingerprint("api_key", "7") != a.fingerprint("api_key", b"7")
    assert a.fingerprint("api_key", "k") == Keyspace(SECRET).fingerprint("api_key", "k")
    assert len(a.fingerprint("api_key", "x" * 1_000_000)) == 16


def test_anonymous_is_not_a_guessable_api_key(keyspace: Keyspace) -> None:
    """Work with no API key shares the anonymous bucket, which no real key can name."""
    limit = Limit("req", "1/s")
    missing = keyspace.bucket(limit, {})
    none = keyspace.bucket(limit, {"api_key": None})
    literal = keyspace.bucket(limit, {"api_key": "anonymous"})
    assert missing == none
    assert literal != missing


@pytest.mark.parametrize("value", [1.5, [1], {"a": 1}, True, object()])
def test_unfingerprintable_identity_values(keyspace: Keyspace, value: object) -> None:
    """Identity values must be strings, bytes or integers; the error does not echo the value."""
    with pytest.raises(IdentityError, match="api_key") as info:
        keyspace.bucket(Limit("req", "1/s"), {"api_key": value})
    assert repr(value) not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"secret": "short"}, "secret"), ({"secret": SECRET, "prefix": "a{b}"}, "prefix")],
)
def test_keyspace_validation(kwargs: dict[str, str], field: str) -> None:
    """A short secret or a prefix with braces is refused, naming the argument."""
    with pytest.raises(ConfigurationError, match=field):
        Keyspace(**kwargs)  # type: ignore[arg-type]


def test_repr_hides_the_secret() -> None:
    """The keyspace's repr never shows its secret."""
    assert SECRET not in repr(Keyspace(SECRET))


def test_equal_values_of_other_types_are_other_identities(keyspace: Keyspace) -> None:
    """1 and "1" are different tenants, True and 1.5 are refused, however often asked."""
    limit = Limit("req", "1/s")
    as_text = keyspace.bucket(limit, {"api_key": "1"})
    as_int = keyspace.bucket(limit, {"api_key": 1})
    assert as_text != as_int
    assert keyspace.bucket(limit, {"api_key": "1"}) == as_text  # remembered, same answer
    for bad in (True, 1.0):
        with pytest.raises(IdentityError):
            keyspace.bucket(limit, {"api_key": bad})


def test_fingerprints_are_stable_across_versions() -> None:
    """Known answers: HMAC-SHA256 (the secret as key) over the dimension, a zero byte, a type
    tag and the value; the first 96 bits, base64url. Buckets in Redis are found by these, so a
    change here would orphan every bucket on upgrade."""
    keyspace = Keyspace("s" * 32)
    assert keyspace.fingerprint("api_key", "key-1") == "Z0vNer1A7zjkUMtc"
    assert keyspace.fingerprint("agent_id", 7) == "W1lcqIDUQXVKhdfV"
    assert keyspace.fingerprint("api_key", b"raw") == "1eXsDtzCZvkjq59F"


def test_the_fingerprint_cache_is_bounded_and_answers_as_computing_does() -> None:
    """At most ``cache_size`` fingerprints are cached, in all dimensions together (then they
    start over), and every answer, cached or not, from any of the three ways in, is the
    computed one; "7", 7 and b"7" stay apart. Made-up dimensions (an identity header's keys
    are the publisher's to choose) do not make room for more."""
    keyspace = Keyspace(SECRET, cache_size=4)
    limit = Limit("req", "10/s", per=("api_key", "agent_id"))
    for round_ in range(3):
        for i in range(10):
            who = {"api_key": f"key-{i % 6}", "agent_id": "a"}
            expected = [keyspace._compute(d, who[d]) for d in ("api_key", "agent_id")]
            assert keyspace.plain_fingerprints(("api_key", "agent_id"), who) == expected
            assert keyspace.bucket(limit, who) == keyspace._layout(limit, expected)
            assert keyspace.fingerprint("api_key", f"key-{i % 6}") == expected[0]
            assert sum(len(known.fps) for known in keyspace._fps.values()) <= 4, round_
    fps = {keyspace.fingerprint("tier", v) for v in ("7", 7, b"7", "7", 7, b"7")}
    assert len(fps) == 3
    for i in range(300):
        assert keyspace.fingerprint(f"made-up-{i}", "v") == keyspace._compute(f"made-up-{i}", "v")
        assert sum(len(known.fps) for known in keyspace._fps.values()) <= 4
    assert len(keyspace._fps) <= 256


def test_a_fingerprint_cache_of_size_0_caches_nothing() -> None:
    """``cache_size=0``: every fingerprint is computed, none is kept."""
    keyspace = Keyspace(SECRET, cache_size=0)
    for _ in range(2):
        assert keyspace.fingerprint("api_key", "k") == keyspace._compute("api_key", "k")
    assert keyspace.plain_fingerprints(("api_key",), {"api_key": "k"}) is not None
    assert all(not known.fps for known in keyspace._fps.values())


@pytest.mark.parametrize("size", [-1, None, True, "8", 8.0])
def test_a_bad_cache_size_is_refused(size: object) -> None:
    """A cache size that is not an integer >= 0 is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match="cache_size"):
        Keyspace(SECRET, cache_size=size)  # type: ignore[arg-type]


def test_a_dimension_whose_values_seldom_recur_stops_being_cached_for_a_while() -> None:
    """When the cache is full, a dimension that had fewer hits than entries since it was last
    emptied (an API key per tenant, many thousands of them) is left alone for 16 x cache_size
    values: they are computed, and neither looked up nor added. One whose values recur (a few
    agents) stays cached."""
    keyspace = Keyspace(SECRET, cache_size=8)
    dims = ("api_key", "agent_id")

    def admit(i: int) -> None:
        who = {"api_key": f"key-{i}", "agent_id": f"agent-{i % 2}"}
        expected = [keyspace._compute(d, who[d]) for d in dims]
        assert keyspace.plain_fingerprints(dims, who) == expected

    for i in range(6):
        admit(i)
    keys, agents = keyspace._fps["api_key"], keyspace._fps["agent_id"]
    assert (len(keys.fps), len(agents.fps), agents.hits) == (6, 2, 4)
    admit(6)  # full: the API keys, never back, pause; the agents, back 4 times, do not
    assert (len(keys.fps), keys.pause, agents.pause) == (0, 128, 0)
    assert len(agents.fps) == 1  # (agent-0, cached again)
    for i in range(7, 7 + 128):
        admit(i)
    assert (len(keys.fps), keys.pause, agents.pause) == (0, 0, 0)
    admit(1000)  # caching again
    admit(1000)
    assert (len(keys.fps), keys.hits) == (1, 1)
    # Threads counting the pause down at once can take it below 0: that caches too.
    keys.pause = -2
    admit(1001)
    assert (len(keys.fps), keys.pause) == (2, -2)


class _Text(str):
    """A subclass of str: fingerprinted as the str it is."""


@pytest.mark.parametrize("length", [16, 63, 64, 65, 200])
def test_fingerprints_are_hmac_sha256_for_every_secret_length(length: int) -> None:
    """The fingerprint is computed from precomputed HMAC pad states; it matches the standard
    library's HMAC for secrets shorter than, equal to and longer than a SHA-256 block."""
    secret = bytes(range(256))[:length] if length < 256 else b"x" * length
    keyspace = Keyspace(secret)
    cases = [
        ("api_key", "key-1", b"skey-1"),
        ("agent_id", "agent-ü\n{}", b"s" + "agent-ü\n{}".encode()),
        ("tier", 42, b"i42"),
        ("model", b"\x00\xff", b"b\x00\xff"),
        ("api_key", "k" * 5000, b"s" + b"k" * 5000),  # too long to cache: computed each time
        ("api_key", _Text("k" * 300), b"s" + b"k" * 300),  # a str, not exactly: the other path
    ]
    for dimension, value, tagged in cases:
        digest = hmac.new(secret, dimension.encode() + b"\0" + tagged, hashlib.sha256).digest()
        expected = base64.urlsafe_b64encode(digest[:12]).decode()
        assert keyspace.fingerprint(dimension, value) == expected
        assert keyspace.fingerprint(dimension, value) == expected  # the cached answer too


def test_limits_sharing_a_dimension_look_its_fingerprint_up_once() -> None:
    """``buckets()`` of two limits keyed by the API key looks the key's fingerprint up once:
    API keys that never come back have no hits, and their cache pauses when it is full, as
    with one such limit."""
    keyspace, fresh = Keyspace(SECRET, cache_size=4), Keyspace(SECRET, cache_size=0)
    limits = [Limit("req", "10/s"), Limit("tokens", "1000/m", unit="tokens")]
    for i in range(5):
        who = {"api_key": f"key-{i}"}
        buckets = keyspace.buckets(limits, who)
        assert buckets == [fresh.bucket(limit, who) for limit in limits]
        assert buckets[0].tag == buckets[1].tag != buckets[0].key != buckets[1].key
    keys = keyspace._fps["api_key"]
    assert (keys.hits, keys.pause) == (0, 64)
