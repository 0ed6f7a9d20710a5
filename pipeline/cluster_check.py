"""Refuse, before any trial or MLflow run, a sweep whose results would stay on one node's disk.

On a Ray cluster of several nodes every trial writes its MLflow run (`tracking_uri`) and its
storage record (`storage`) from the node it runs on. A SQLite file or a local folder is then a
different file on every node, and the driver only sees its own: results are silently lost.
`refuse_node_local` names each such key; `PERL_SHARED_FS=1` tells it that every node sees the
same files at these paths (several nodes on one host, or a shared NFS/Lustre mount).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from perl_core.data.storage import protocol_of
from pipeline.spec import SpecError, SweepSpec, check_tracking_uri

SHARED_FS_ENV = "PERL_SHARED_FS"
# fsspec protocols that are one process's or one node's own (memory:// is per process)
_NODE_LOCAL_PROTOCOLS = ("file", "memory")


def joins_cluster(env: dict[str, str] | None = None) -> bool:
    """Whether `ray.init()` here attaches to a running cluster ($RAY_ADDRESS, which `ray job
    submit` sets; a Ray already up; the last `ray start` on this host). A Ray that this driver
    starts itself is one node, so the check needs no Ray then."""
    env = dict(os.environ) if env is None else env
    if env.get("RAY_ADDRESS", "") not in ("", "local"):
        return True
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return True
    try:  # Ray's own resolution of ray.init(address=None): None means "start a local Ray"
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is not None
    except Exception:  # another Ray layout: the later ray.init() decides alone, unchecked
        return False


def refuse_node_local(spec: SweepSpec, uri: str, nodes: list[dict[str, Any]],
                      env: dict[str, str] | None = None) -> None:
    """Raise SpecError naming `tracking_uri`, `storage` and `cache.url` where they are node-local
    (a SQLite file; a path, file:// or memory://; an explicit local cache folder) while `nodes`
    (`ray.nodes()`; dead ones are ignored) has more than one alive node, or the driver is a Ray
    Client (`RAY_ADDRESS=ray://...`: its disk is none of the nodes'). `uri` is the resolved
    tracking URI; `PERL_SHARED_FS=1` in `env` accepts paths every node sees."""
    env = dict(os.environ) if env is None else env
    alive = [n for n in nodes if n.get("Alive")]
    client = env.get("RAY_ADDRESS", "").startswith("ray://")
    if (len(alive) <= 1 and not client) or env.get(SHARED_FS_ENV, "") == "1":
        return
    where = ("this driver is a Ray Client (RAY_ADDRESS=ray://...) outside the cluster" if client
             else f"Ray has {len(alive)} nodes alive")
    shared = (f"; if every node sees this path (nodes on one host, a shared NFS mount), set "
              f"{SHARED_FS_ENV}=1")
    problems = []
    if _file_store(uri):
        problems.append(("tracking_uri", (
            f"{uri} is a file on one node's disk, but {where}: trials on the other nodes would "
            f"write their MLflow runs to their own disks, which the driver never sees. Use an "
            f"http(s):// tracking server (cluster/README.md, Multi-node){shared}")))
    if protocol_of(spec.storage) in _NODE_LOCAL_PROTOCOLS:
        problems.append(("storage", (
            f"{spec.storage} is node-local, but {where}: each trial would write its record and "
            f"Tune state to its own node. Use s3:// (or another shared fsspec URL){shared}")))
    cache = spec.cache.url if spec.cache.enabled else None
    if cache and protocol_of(cache) in _NODE_LOCAL_PROTOCOLS:
        problems.append(("cache.url", (
            f"{spec.cache.url} is a folder on each node's own disk, but {where}: the cache "
            f"would not be shared. Leave cache.url out (a node-local cache per node) or use "
            f"s3://{shared}")))
    if problems:
        raise SpecError(spec.source or "<sweep>", problems)


def _file_store(uri: str) -> bool:
    """SQLite, or what `check_tracking_uri` refuses anyway (file:, a plain path)."""
    try:
        check_tracking_uri(uri)
    except ValueError:
        return True
    return uri.startswith("sqlite:")
