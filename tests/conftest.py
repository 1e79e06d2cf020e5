# SPDX-License-Identifier: MIT
"""Shared fixtures: a private redis-server for the whole run, a Redis Cluster when asked for,
and the two stores every core test runs over."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import redis.cluster

from tests.redis_servers import RedisCluster, RedisServer
from throttle import Keyspace, MemoryStore, RedisStore
from throttle.store.base import BaseStore
from throttle.testing import ManualClock

SECRET = "test-secret-with-enough-bytes-0123456789"

#: A fixed point on the simulated clock (microseconds), so tests pass ``now_us`` explicitly and
#: never depend on the Redis server's clock. Large, like a real epoch time in microseconds.
T0 = 1_760_000_000_000_000


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the run, on a free loopback port."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the private server, emptied before each test."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A private Redis Cluster of three masters (started on first use)."""
    with RedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def keyspace() -> Keyspace:
    """The keyspace the tests share."""
    return Keyspace(SECRET, prefix="t")


@pytest.fixture
def clock() -> ManualClock:
    """A clock that only moves when a test moves it."""
    return ManualClock(T0)


@pytest.fixture
def cluster_client(redis_cluster: RedisCluster) -> Iterator[redis.cluster.RedisCluster]:
    """A client of the private cluster, every master emptied before each test."""
    client = redis_cluster.client()
    client.flushall(target_nodes=redis.cluster.RedisCluster.PRIMARIES)
    yield client
    client.close()


@pytest.fixture(params=["redis", "cluster", "memory"])
def store(request: pytest.FixtureRequest, keyspace: Keyspace, clock: ManualClock) -> BaseStore:
    """Each core test runs against one Redis, a 3-master Redis Cluster and the in-process
    store."""
    if request.param == "redis":
        return RedisStore(request.getfixturevalue("redis_client"), keyspace)
    if request.param == "cluster":
        return RedisStore(request.getfixturevalue("cluster_client"), keyspace)
    return MemoryStore(keyspace, clock=clock)
