"""The hold queue as configured: which store keeps the mail (``[store] kind``).

- ``files``: each message in a file on this node's spool; Redis is the index
  only.  One node: a second instance with another spool on the same Redis
  would index mail that the first cannot read (and drop it as stale), so the
  first files store to start on a Redis claims it, and another spool is
  refused at start, by name.
- ``redis``: message and index together in Redis (Cluster or Sentinel), so
  every node serves every customer.
"""

from __future__ import annotations

from odmr_bridge import keys, redis_topology
from odmr_bridge.config import Settings
from odmr_bridge.index import Index
from odmr_bridge.leases import NodeIdentity
from odmr_bridge.queue import HoldQueue
from odmr_bridge.redis_store import RedisStore
from odmr_bridge.redis_topology import AsyncClient
from odmr_bridge.spool import Spool


class StoreClaimed(Exception):
    """Another spool's files store already uses this Redis."""


async def claim_for_files(client: AsyncClient, spool: Spool, node: NodeIdentity) -> None:
    """Make this spool the one files store on this Redis, or say who is."""
    me = f"{node.spool} ({spool.root})"
    await client.set(keys.FILES_STORE, me, nx=True)
    holder = await client.get(keys.FILES_STORE)
    holder = holder.decode() if isinstance(holder, bytes) else holder
    if holder != me:
        raise StoreClaimed(
            f"this Redis already holds the index of another bridge's spool ({holder}); "
            f"a second instance with its own spool ({me}) would strand mail. Several "
            f"nodes share one queue with [store] kind = \"redis\"; if that spool is gone "
            f"for good, delete the key {keys.FILES_STORE} and start again")


async def open_queue(settings: Settings, client: AsyncClient, spool: Spool,
                     owner: str = "") -> HoldQueue:
    """The hold queue on the configured store (*owner*: this node, for its leases)."""
    index = Index(client, owner=owner)
    if settings.store.kind == "redis":
        store = RedisStore(client, redis_topology.wait_replicas(settings.redis),
                           int(settings.store.wait_timeout * 1000),
                           scratch_dir=str(spool.incoming))
        await store.prepare()
        return HoldQueue(store, index)
    return HoldQueue(spool, index)
