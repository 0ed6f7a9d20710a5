"""Refuse, before any trial or MLflow run, a sweep whose results would stay on one node's disk.

On a Ray cluster of several nodes every trial writes its MLflow run (`tracking_uri`) and its
storage record (`storage`) from the node it runs on. A SQLite file or a local folder is then a
different file on every node, and the driver only sees its own: results are silently lost.
A tracking server on a loopback address (`http://127.0.0.1:5000`, the server script's default
bind) is the same: each node would reach its own. `refuse_node_local` names each such key;
`PERL_SHARED_FS=1` tells it that every node sees the same files at these paths (several nodes on
one host, or a shared NFS/Lustre mount); it does not make a loopback address shared.

"More than one node" is not only the nodes alive when the driver starts: a cluster whose
autoscaler adds nodes later (cluster/ray-cluster.yaml, cluster/kuberay-rayjob.yaml: workers
from 0), or whose driver node cannot host a trial (their head has 0 CPUs), runs its trials on
other nodes too.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from typing import Any
from urllib.parse import urlsplit

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
                      env: dict[str, str] | None = None, *, driver_node: str | None = None,
                      autoscaling: bool | None = None) -> None:
    """Raise SpecError naming `tracking_uri`, `storage` and `cache.url` where they are node-local
    (a SQLite file or a loopback server; a path, file:// or memory://; an explicit local cache
    folder) while trials may run on another node than the driver's (`off_driver_reason`).
    `nodes`: `ray.nodes()`; `uri`: the resolved tracking URI; `PERL_SHARED_FS=1` in `env`
    accepts paths every node sees. `driver_node` (the driver's NodeID) and `autoscaling` are
    asked of the connected Ray when not given (`ray_facts`)."""
    env = dict(os.environ) if env is None else env
    if driver_node is None and autoscaling is None:
        driver_node, autoscaling = ray_facts()
    where = off_driver_reason(nodes, env, driver_node, bool(autoscaling), spec.resources)
    if where is None:
        return
    shared_fs = env.get(SHARED_FS_ENV, "") == "1"
    problems = []
    if _loopback_server(uri):
        problems.append(("tracking_uri", (
            f"{uri} is a server on this node's loopback address, but {where}: trials on the "
            f"other nodes would reach their own {urlsplit(uri).hostname}, not this server. Give "
            f"an address every node reaches (the server's host name or IP, and bind the server "
            f"to it: cluster/README.md, Multi-node)")))
    if not shared_fs:
        _file_problems(spec, uri, where, problems)
    if problems:
        raise SpecError(spec.source or "<sweep>", problems)


def _file_problems(spec: SweepSpec, uri: str, where: str, problems: list) -> None:
    shared = (f"; if every node sees this path (nodes on one host, a shared NFS mount), set "
              f"{SHARED_FS_ENV}=1")
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


def off_driver_reason(nodes: list[dict[str, Any]], env: dict[str, str], driver_node: str | None,
                      autoscaling: bool, resources: Any) -> str | None:
    """Why trials may run on a node other than the driver's, or None when they cannot: more
    than one alive node; a Ray Client driver (RAY_ADDRESS=ray://..., its disk is none of the
    nodes'); an autoscaler (it adds nodes after this check); or a driver node (`driver_node`, a
    NodeID of `nodes`) without the CPUs/GPUs one trial asks for (`resources`: the sweep's), so
    every trial goes to nodes that may join later."""
    alive = [n for n in nodes if n.get("Alive")]
    if env.get("RAY_ADDRESS", "").startswith("ray://"):
        return "this driver is a Ray Client (RAY_ADDRESS=ray://...) outside the cluster"
    if len(alive) > 1:
        return f"Ray has {len(alive)} nodes alive"
    if autoscaling:
        return "the Ray cluster has an autoscaler, which adds nodes for the trials"
    mine = [n for n in alive if driver_node and n.get("NodeID") == driver_node]
    if mine:
        have = mine[0].get("Resources") or {}
        cpu, gpu = float(have.get("CPU", 0)), float(have.get("GPU", 0))
        if cpu < resources.cpu or gpu < resources.gpu:
            return (f"the driver's node cannot host a trial ({cpu:g} CPU, {gpu:g} GPU; a trial "
                    f"asks for {resources.cpu:g} CPU, {resources.gpu:g} GPU), so trials run on "
                    f"nodes that join later")
    return None


def ray_facts() -> tuple[str | None, bool]:
    """(the driver's NodeID, whether an autoscaler runs) of the Ray this process is connected
    to; (None, False) without one. Best effort: what Ray does not tell is taken as absent."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None, False
    try:
        node = ray.get_runtime_context().get_node_id()
    except Exception:
        node = None
    return node, _autoscaler_running()


def _autoscaler_running() -> bool:
    """An autoscaler with a node-type config reported to this cluster's GCS. Every head runs
    Ray's monitor: without a config (`ray start`, `ray.init()`) its v1 report names each node's
    type `node_<NodeID>` (the read-only provider); with one (`ray up`, KubeRay v1) the config's
    type names. Autoscaler v2 reports a state version above 0."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        status = _internal_kv_get("__autoscaling_status")
        report = (json.loads(status) if status else {}).get("autoscaler_report") or {}
        if any(kind != f"node_{node}" for node, kind in
               (report.get("node_type_mapping") or {}).items()):
            return True
    except Exception:
        pass
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        gcs = ray.get_runtime_context().gcs_address
        version = get_cluster_status(gcs, timeout=10).stats.autoscaler_version
        return version not in (None, "", "0")
    except Exception:
        return False


def _loopback_server(uri: str) -> bool:
    """An http(s) tracking URI whose host is this machine only (localhost, 127.x, ::1, 0.0.0.0)."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def _file_store(uri: str) -> bool:
    """SQLite, or what `check_tracking_uri` refuses anyway (file:, a plain path)."""
    try:
        check_tracking_uri(uri)
    except ValueError:
        return True
    return uri.startswith("sqlite:")
