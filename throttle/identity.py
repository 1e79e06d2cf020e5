# SPDX-License-Identifier: MIT
"""Who a unit of work is charged to, and the Redis keys that follows from it.

An identity maps dimension names (``api_key``, ``agent_id``, ``tier``, custom ones) to values.
Values never reach Redis, a log or an event: each is replaced by a keyed fingerprint,
HMAC-SHA256 over the dimension name and the value under a secret, truncated to 96 bits. The
secret matters: without it, anyone who can read the keys could confirm a guessed API key.

Key layout (``P`` is the prefix, ``K`` the API key's fingerprint, ``A`` another dimension's)::

    P:{K}:<limit>            a tenant limit (per api_key)
    P:{K}:<limit>:A          a limit per api_key and agent_id (or tier, or a custom dimension)
    P:{K}:<limit>:~n         the running total beside a sliding_window log
    P:{K}:~b:<booking id>    a booking (reservation) made for work of that tenant
    P:{K}:~d:<task id>       the token of the live copy of deferred work (see store.Guard)
    P:{<limit>}              a global limit
    P:{<limit>:A}            a limit per non-tenant dimension only (per model, say)

Everything of one tenant shares the ``{K}`` hash tag, so one admission is one Redis Cluster slot.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import importlib
import operator
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from throttle.errors import ConfigurationError, IdentityError
from throttle.limits import Limit

__all__ = ["Bucket", "Fingerprint", "Keyspace"]

_PREFIX_RE: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
_BOOKING_RE: Final = re.compile(r"^[A-Za-z0-9_-]{8,64}\Z")
# Values longer than this are fingerprinted every time rather than cached, so a stream of huge
# identities cannot grow the cache by megabytes.
_CACHEABLE_LEN: Final = 256
_DIMENSIONS_CACHED: Final = 256  # dimensions whose fingerprints are cached, at most
_FINGERPRINT_LEN: Final = 16  # characters: 96 bits in URL-safe base64
_FINGERPRINT_RE: Final = re.compile(r"^[A-Za-z0-9_-]{16}\Z")
# The bytes of URL-safe base64 where standard base64 has others.
_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")


def _builtin_sha256() -> Callable[[bytes], Any]:
    """SHA-256 by CPython's own module when it has one: its states copy in a fraction of the
    time an OpenSSL 3 state takes, and a fingerprint copies two (same digests, of course).
    ``hashlib``'s otherwise: on another interpreter (PyPy's is pure Python), with OpenSSL in
    FIPS mode (whose own must be used there), or a build without its own hashes."""
    if sys.implementation.name != "cpython" or _fips_mode():
        return hashlib.sha256
    for module in ("_sha2", "_sha256"):  # its name since 3.12, and before
        try:
            found: Callable[[bytes], Any] = importlib.import_module(module).sha256
        except (ImportError, AttributeError):
            continue
        if found(b"abc").digest() == hashlib.sha256(b"abc").digest():
            return found
    return hashlib.sha256


def _fips_mode() -> bool:
    try:
        return bool(importlib.import_module("_hashlib").get_fips_mode())
    except (ImportError, AttributeError, ValueError):
        return False


_sha256: Final = _builtin_sha256()

# Integers up to this many bits (about 600 digits) are fingerprinted in decimal.
_DECIMAL_BITS: Final = 2000


class Fingerprint(str):
    """A value that is already a fingerprint (from a verified message header): used as is."""

    __slots__ = ()

    def __new__(cls, value: str) -> Fingerprint:
        if not isinstance(value, str) or not _FINGERPRINT_RE.match(value):
            raise ValueError("not a fingerprint")
        return super().__new__(cls, value)


class Bucket(NamedTuple):
    """Where one limit's state lives for one identity. ``tag`` is the hash tag, braces included."""

    tag: str
    key: str


_new_bucket = tuple.__new__  # a Bucket without its Python-level __new__, on the hot path


def _nothing(fps: Sequence[str]) -> tuple[()]:
    return ()


class KeyTemplate(NamedTuple):
    """The buckets of a list of limits as a template (see :meth:`Keyspace.key_template`)."""

    dims: tuple[str, ...]  # whose fingerprints fill it in, in this order
    text: str  # a %-format template of the fingerprints that ``pick`` picks from them
    pick: Callable[[Sequence[str]], Any]
    nlimits: int  # how many limits (tag and key pairs) it holds

    def fill(self, fps: Sequence[str]) -> list[str]:
        """Tag, key, tag, key, ... of every limit in order, then the extra part if any."""
        text: str = self.text % self.pick(fps)
        return text.split("\0")


class Keyspace:
    """Turns (limit, identity) into bucket keys, under ``prefix``, with fingerprints keyed by
    ``secret``. Thread-safe; fingerprints of short values are cached, ``cache_size`` of them
    in all (0: none), and a dimension whose values seldom recur stops being cached for a
    while."""

    __slots__ = (
        "_buckets",
        "_cache_size",
        "_fps",
        "_fps_count",
        "_inner",
        "_inner_by_dim",
        "_inner_str",
        "_outer",
        "_secret",
        "prefix",
        "signing_key",
    )

    def __init__(self, secret: bytes | str, *, prefix: str = "throttle", cache_size: int = 65536):
        if isinstance(secret, str):
            secret = secret.encode()
        if not isinstance(secret, bytes) or len(secret) < 16:
            raise ConfigurationError(
                "secret",
                "the fingerprint secret must be at least 16 bytes",
                "a long random string, e.g. from `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`",
            )
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ConfigurationError(
                "cache_size", f"must be an integer >= 0, got {cache_size!r}", "0 caches nothing"
            )
        if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
            raise ConfigurationError(
                "prefix",
                f"invalid key prefix {prefix!r}",
                "1 to 64 characters of letters, digits, '_', '.', ':', '-' (no braces)",
            )
        self.prefix = prefix
        self._secret = secret
        # HMAC-SHA256 (RFC 2104) from its two keyed hash states, each absorbed once: copying a
        # hash state is much cheaper than hmac.new or an hmac object's copy.
        block = (hashlib.sha256(secret).digest() if len(secret) > 64 else secret).ljust(64, b"\0")
        self._inner = _sha256(bytes(b ^ 0x36 for b in block))
        self._outer = _sha256(bytes(b ^ 0x5C for b in block))
        self._inner_by_dim: dict[str, Any] = {}  # the inner state with "<dimension>\0" absorbed
        self._inner_str: dict[str, Any] = {}  # ... and "s" too, the type tag of a str
        #: A key derived from the secret for signing message headers (never the secret itself).
        self.signing_key = hmac.new(secret, b"throttle header signing", hashlib.sha256).digest()
        #: Fingerprints of short values, per dimension (see _Known), ``cache_size`` of them
        #: in all (then every dimension's start over). Not an LRU: with many thousands of
        #: tenants nearly every API key is new, and an LRU's upkeep on each (unlinking the
        #: oldest entry, in memory long out of the CPU's caches) cost more than its hash.
        self._fps: dict[str, _Known] = {}
        self._fps_count = 0  # fingerprints cached, in every dimension
        self._cache_size = cache_size
        self._buckets: dict[tuple[object, ...], Bucket] = {}

    def __repr__(self) -> str:  # never show the secret
        return f"Keyspace(prefix={self.prefix!r})"

    def fingerprint(self, dimension: str, value: object) -> str:
        """The 16-character fingerprint standing for ``value`` of ``dimension``.

        Strings, bytes and integers are accepted; ``"7"`` and ``7`` are different identities.
        A :class:`Fingerprint` is returned as it is.
        """
        if isinstance(value, Fingerprint):
            return str(value)
        if isinstance(value, str):
            if len(value) <= _CACHEABLE_LEN:
                return self._cached(dimension, value)
        elif isinstance(value, bytes | int) and not isinstance(value, bool):
            if not isinstance(value, bytes) or len(value) <= _CACHEABLE_LEN:
                return self._cached(dimension, value)
        else:
            raise IdentityError(
                dimension, f"must be a string, bytes or an integer, got {type(value).__name__}"
            )
        return self._compute(dimension, value)

    def _cached(self, dimension: str, value: str | bytes | int | _Anonymous) -> str:
        """The fingerprint of ``value`` (short, or an int: see :meth:`fingerprint`), from the
        cache when it is there. (``1`` and ``True`` would share an entry: no bool comes here.)"""
        known = self._fps.get(dimension)
        if known is not None and known.pause <= 0:
            found = known.fps.get(value)
            if found is not None:
                known.hits += 1
                return found
        return self._remember(dimension, value)

    def _remember(self, dimension: str, value: str | bytes | int | _Anonymous) -> str:
        """The fingerprint of ``value``, computed, and cached unless its dimension's cache
        is paused."""
        fp = self._compute(dimension, value)
        known = self._fps.get(dimension)
        if known is None:
            if not self._cache_size:
                return fp
            if len(self._fps) >= _DIMENSIONS_CACHED:  # names from the configuration, mostly
                self._fps.clear()
                self._fps_count = 0
            known = self._fps[dimension] = _Known()
        elif known.pause > 0:
            known.pause -= 1
            return fp
        if self._fps_count >= self._cache_size:
            self._start_over()
            if known.pause > 0:
                return fp
        known.fps[value] = fp
        self._fps_count += 1
        return fp

    def _start_over(self) -> None:
        """Empty the fingerprint cache (it is full). A dimension that had fewer hits than
        entries since it was last emptied has values that seldom recur (an API key per tenant,
        many thousands of them): it stops being cached for a while."""
        for known in self._fps.values():
            if known.hits < len(known.fps):
                known.pause = 16 * self._cache_size
            known.fps.clear()
            known.hits = 0
        self._fps_count = 0

    def _compute(self, dimension: str, value: str | bytes | int | _Anonymous) -> str:
        if type(value) is str:  # nearly always: its type tag is in the state already
            inner = self._inner_str.get(dimension)
            if inner is None:
                inner = self._inner_for(dimension, b"s")
            inner = inner.copy()
            inner.update(value.encode("utf-8", "surrogatepass"))
        else:
            if isinstance(value, _Anonymous):
                # Its own type tag: a caller whose API key is "anonymous" is not anonymous.
                raw = b"a" + value.label.encode()
            elif isinstance(value, str):
                raw = b"s" + value.encode("utf-8", "surrogatepass")
            elif isinstance(value, bytes):
                raw = b"b" + value
            elif value.bit_length() <= _DECIMAL_BITS:
                raw = b"i" + str(value).encode()
            else:
                # Past what every interpreter converts to decimal (sys.set_int_max_str_digits
                # allows no less than 640 digits): hexadecimal, under a type tag of its own.
                raw = b"x" + format(value, "x").encode()
            inner = self._inner_for(dimension, b"").copy()
            inner.update(raw)
        outer = self._outer.copy()
        outer.update(inner.digest())
        mac = binascii.b2a_base64(outer.digest()[:12], newline=False)  # 16 characters, no "="
        return mac.translate(_URLSAFE).decode()

    def _inner_for(self, dimension: str, tag: bytes) -> Any:
        """The inner hash state with ``dimension``, a zero byte and ``tag`` (b"s", the type tag
        of a str, or nothing) absorbed; kept for 256 dimensions (names from the
        configuration, mostly)."""
        states = self._inner_str if tag else self._inner_by_dim
        inner = states.get(dimension)
        if inner is None:
            inner = self._inner.copy()
            inner.update(dimension.encode() + b"\0" + tag)
            if len(states) < 256:
                states[dimension] = inner
        return inner

    def bucket(self, limit: Limit, identity: Mapping[str, object]) -> Bucket:
        """The bucket of ``limit`` for ``identity``. A dimension the identity lacks (or maps to
        None) takes the limit's ``anonymous`` value."""
        # Every admission asks this for each of its limits: remember recent answers, keyed by
        # what the key is made of. Only str and None values are remembered: 1, 1.0 and True are
        # equal as dict keys but not as identities (a float or a bool is even an error).
        values = tuple([identity.get(dim) for dim in limit.per])
        memo = (limit.name, limit.per, limit.anonymous, values)
        plain = all(v is None or (type(v) is str and len(v) <= _CACHEABLE_LEN) for v in values)
        if plain:
            found = self._buckets.get(memo)
            if found is not None:
                return found
        bucket = self._bucket(limit, identity)
        if plain:
            if len(self._buckets) >= self._cache_size:
                self._buckets.clear()
            self._buckets[memo] = bucket
        return bucket

    def _bucket(
        self, limit: Limit, identity: Mapping[str, object], found: dict[str, str] | None = None
    ) -> Bucket:
        """``limit``'s bucket; ``found`` holds the fingerprints of ``identity``'s strings
        looked up already, by dimension, and takes those looked up here."""
        cached = self._cached
        fps = []
        for dim in limit.per:  # on every admission: kept lean
            value = identity.get(dim)
            if value is None:
                fps.append(cached(dim, _Anonymous(limit.anonymous)))
            elif type(value) is str and len(value) <= _CACHEABLE_LEN:
                if found is None:
                    fps.append(cached(dim, value))
                else:
                    fp = found.get(dim)
                    if fp is None:
                        fp = found[dim] = cached(dim, value)
                    fps.append(fp)
            else:
                fps.append(self.fingerprint(dim, value))
        return self._layout(limit, fps)

    def buckets(self, limits: Sequence[Limit], identity: Mapping[str, object]) -> list[Bucket]:
        """The buckets of ``limits`` for ``identity``, as :meth:`bucket` gives them, without
        remembering them: for admissions whose identities seldom recur. Each value's
        fingerprint is looked up once, however many limits are keyed by its dimension: a
        second lookup would count as a hit, and keep a dimension whose values never come
        back from pausing its cache."""
        found: dict[str, str] = {}
        return [self._bucket(limit, identity, found) for limit in limits]

    def key_template(
        self, limits: Sequence[Limit], extra: Callable[[list[str]], str | None] | None = None
    ) -> KeyTemplate | None:
        """The buckets of ``limits`` for every identity whose values of their dimensions are
        all strings of at most 256 characters, as one template to fill in with those values'
        fingerprints (see :meth:`plain_fingerprints`): each limit's tag and key, then
        ``extra`` of the keys when it is given (another spelling of them, which must hold
        each key verbatim), separated by NUL. None when there is no such template (or
        ``extra`` gives none)."""
        dims = tuple(dict.fromkeys(d for limit in limits for d in limit.per))
        # Stand-ins for the fingerprints, as long as one (every fingerprint is 16 characters,
        # which the packed keys' lengths count on) and made of characters none has.
        marks = [f"\x01{i:0{_FINGERPRINT_LEN - 2}d}\x01" for i in range(len(dims))]
        mark = dict(zip(dims, marks, strict=True))
        buckets = [self._layout(limit, [mark[d] for d in limit.per]) for limit in limits]
        parts = [part for bucket in buckets for part in bucket]
        if extra is not None:
            spelt = extra([bucket.key for bucket in buckets])
            if spelt is None:
                return None
            parts.append(spelt)
        marked = "\0".join(parts)
        found = re.compile("|".join(map(re.escape, marks))) if marks else None
        order = [] if found is None else [marks.index(m) for m in found.findall(marked)]
        text = marked.replace("%", "%%")
        if found is not None:
            text = found.sub("%s", text)
        # (itemgetter picks one item as itself, and a lone string is what % takes for it.)
        pick = operator.itemgetter(*order) if order else _nothing
        if text % pick(marks) != marked:
            return None
        return KeyTemplate(dims, text, pick, len(limits))

    def plain_fingerprints(
        self, dims: Sequence[str], identity: Mapping[str, object]
    ) -> list[str] | None:
        """The fingerprints of ``identity``'s values of ``dims``, when each is a string of at
        most 256 characters (else None), as :meth:`bucket` finds them."""
        by_dim = self._fps
        fps = []
        for dim in dims:
            value = identity.get(dim)
            if type(value) is not str or len(value) > _CACHEABLE_LEN:
                return None
            # (_cached's lookup, written out: a call less per dimension on every admission of
            # a plan not remembered, about 0.25 us of a new tenant's with cold CPU caches.)
            known = by_dim.get(dim)
            if known is not None and known.pause <= 0:
                found = known.fps.get(value)
                if found is not None:
                    known.hits += 1
                    fps.append(found)
                    continue
            fps.append(self._remember(dim, value))
        return fps

    def _layout(self, limit: Limit, fps: list[str]) -> Bucket:
        """The bucket of ``limit`` given the fingerprints of its dimensions, in ``per`` order."""
        if limit.is_global:
            tag = "{" + ":".join([limit.name, *fps]) + "}"
            return _new_bucket(Bucket, (tag, f"{self.prefix}:{tag}"))
        # ``per`` is in canonical order, so api_key comes first.
        tag = "{" + fps[0] + "}"
        if len(fps) == 1:
            return _new_bucket(Bucket, (tag, f"{self.prefix}:{tag}:{limit.name}"))
        return _new_bucket(Bucket, (tag, ":".join([self.prefix, tag, limit.name, *fps[1:]])))

    def booking_key(self, tag: str, booking_id: str) -> str:
        """The key of a booking made in the slot of ``tag``."""
        return f"{self.prefix}:{tag}:~b:{booking_id}"

    def load_factor_key(self) -> str:
        """The cluster-wide load factor in force (a string holding a number in (0, 1])."""
        return f"{self.prefix}:{{~load}}:factor"

    def load_state_key(self) -> str:
        """The computed load factor and when it last changed (a hash)."""
        return f"{self.prefix}:{{~load}}:state"

    def load_samples_key(self) -> str:
        """The workers' live load samples (a hash: worker -> time and sample)."""
        return f"{self.prefix}:{{~load}}:samples"

    def load_override_key(self) -> str:
        """An operator's load factor override (a string)."""
        return f"{self.prefix}:{{~load}}:override"

    def counts_key(self, minute: int) -> str:
        """The traffic counts of one minute (a hash: field -> amount), for operators' tools."""
        return f"{self.prefix}:{{~counts}}:{minute}"

    def tenant_tag(self, identity: Mapping[str, object], anonymous: str = "anonymous") -> str:
        """The hash tag of the tenant (``api_key``) of ``identity``: the slot its buckets live
        in. An identity without an API key is the ``anonymous`` tenant."""
        value = identity.get("api_key")
        if value is None:
            return "{" + self._cached("api_key", _Anonymous(anonymous)) + "}"
        return "{" + self.fingerprint("api_key", value) + "}"

    def upstream_key(self, tag: str) -> str:
        """The upstream factor of the tenant whose hash tag is ``tag``."""
        return f"{self.prefix}:{tag}:~u"

    def guard_key(self, tag: str, work_id: str) -> str:
        """The key holding the live deferral token of one unit of work (a task id)."""
        return f"{self.prefix}:{tag}:~d:{work_id}"

    @staticmethod
    def check_booking_id(booking_id: object) -> str:
        """Reject a booking id that could not have come from a store (wrong type or charset)."""
        if not isinstance(booking_id, str) or not _BOOKING_RE.match(booking_id):
            raise IdentityError("booking", "not a booking id issued by a throttle store")
        return booking_id


def total_key(bucket: Bucket) -> str:
    """The running-total key beside a sliding_window log."""
    return bucket.key + ":~n"


class _Known:
    """The fingerprints of one dimension's short values (value -> fingerprint), with the hits
    since they were last emptied (see Keyspace._start_over); while ``pause`` is above 0 it is
    neither read nor added to, and each value computed counts it down. (Threads that count it
    down at once can take it below 0: that is not paused.)"""

    __slots__ = ("fps", "hits", "pause")

    def __init__(self) -> None:
        self.fps: dict[object, str] = {}
        self.hits = 0
        self.pause = 0


@dataclass(frozen=True, slots=True)
class _Anonymous:
    label: str
