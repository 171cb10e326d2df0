"""The shared cache on a small Redis Cluster (three masters on loopback)."""

from __future__ import annotations

import pytest

from sidecar.dns.wire import make_key
from sidecar.testing.redisserver import RedisCluster, available

# The fixtures (fleet, upstream) come with the helpers; redis_server is overridden below.
from tests.test_fleet_batch import caches, keys  # noqa: F401
from tests.test_fleet_notices import hand_over
from tests.test_fleet_shared import addresses, fleet, settle, upstream  # noqa: F401

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


@pytest.fixture(scope="module")
def cluster():
    with RedisCluster(3) as cl:
        yield cl


@pytest.fixture
def redis_server(cluster):
    # test_fleet_shared's `fleet` fixture takes its URL from here.
    return cluster


async def test_sidecars_share_entries_through_a_cluster(fleet, upstream, cluster):  # noqa: F811
    a, b = await fleet(2)
    assert a.shared.cluster and a.shared.stats()["url"].startswith("redis+cluster://")
    names = [f"h{i}.example.test" for i in range(30)]     # spread over the hash slots
    for name in names:
        assert addresses(await a.ask(name)) == {"127.0.0.1"}
    await settle(a)
    upstream.reset_counts()
    for name in names:
        assert addresses(await b.ask(name)) == {"127.0.0.1"}
    assert upstream.queries == 0
    assert b.shared.stats()["hits"] == len(names)
    slots = {int(cluster.nodes[0].cli("cluster", "keyslot",
                                      a.shared.data_key(make_key(n, 1)).decode()))
             for n in names}
    owners = {s * 3 // 16384 for s in slots}
    assert len(owners) == 3, "the keys landed on every node"


async def test_a_waiter_is_noticed_through_the_cluster(caches):  # noqa: F811
    """The write's script publishes on the node of the key's slot; the waiter's subscription
    may be on any node (classic pub/sub crosses the cluster bus)."""
    holder, waiter = await caches(), await caches(poll_interval=1.0)
    ks = keys(30, "c")
    assert all(e is not None for e in await hand_over(holder, waiter, ks))
    st = waiter.stats()
    assert st["notices"]["used"] == len(ks) and st["batches"]["polls"] == 0, st
