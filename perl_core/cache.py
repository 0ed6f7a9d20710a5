"""FeatureCache: an explicit, fsspec-backed store of frozen features (safetensors blobs).

What is cached: what no projector touches, i.e. everything up to the recurrence:
  - per image batch: S_v = blocks[:J](embed(x)) and the zero-shot state h(0) (the raw CLS row of
    the upper blocks without thoughts; v0 = readout(h(0)));
  - the normalised pixels of the evaluation's Jacobian subsample (`perl_core.evaluate.
    jacobian_metrics`: the gradient w.r.t. pixels runs through the lower blocks too);
  - per chunk of class prompts: S_t (cut after the chunk's last EOS: `PerlModel.text_prefix`;
    the key hashes the full (C, ctx) tokens, which fix that cut) and the text h(0) (raw EOS row).
Entries are written for evaluation batches (test / val sets: shared by every trial with the same
CLIP weights and J, whatever K, seed, lr, ...) and for training views: a training batch is a pure
function of (items, per-item augmentation seed, transform) (`perl_core.train.SeededItems`), so
trials that differ only in K, lr, anchor_weight or weight_decay read the same views. On a hit
nothing is decoded: `cached_batches` sends only the missing batches through the DataLoader.

Keys are sha256 over (kind, model fingerprint (sha256 of the CLIP state dict), inject depth d0,
dataset, split, transform id, prompt template, the batch's items (path, label, augmentation
seed), compute mode (device type, fp32 or autocast dtype), torch/torchvision versions, storage
dtype). Nothing is cached implicitly: callers pass a FeatureCache object (`fit(..., cache=...)`,
`evaluate_task(..., cache=...)`); the only state it keeps in memory is its hit/miss counters and
a per-object memo of model fingerprints.

Storage dtype: `dtype=torch.float16` (default) halves the space and changes results at the fp16
rounding level; `dtype=torch.float32` stores fp32 and bf16 features bit-exactly (the cached path
then gives exactly the uncached numbers). A blob is read back in the dtype it was computed in, and
a miss returns the computed features rounded through the storage dtype too, so the trial that
fills the cache and the trials that read it see the same inputs.
Writes go to a temporary name then are renamed (concurrent writers of one key write the same
bytes); a blob that fails to parse or has the wrong metadata is treated as a miss and recomputed.
A size cap (`max_bytes`) evicts the oldest files by mtime (a hit touches the file: LRU-ish); it is
enforced when this object's running total passes it and on every 64th write (a rescan that also
sees what other processes wrote), so the store can overshoot by what others wrote meanwhile.

Concurrent trials of one group (several trials per GPU, or per node with the node-local store)
would all miss the same batches and compute them again. On a local store (a node's disk or a
shared POSIX file system) `cached_batches` therefore claims the batches it is about to compute
(an exclusive-create `<blob>.claim` file naming its holder) and waits for the batches another
live holder claimed, reading them when they appear. Both walk the batches in the same order, so
neither waits on the other in a cycle. A holder that is gone (its process is dead on this host,
or it has not shown life for `CLAIM_STALE_S`) loses its claims, and a waiter computes the batch
itself after `CLAIM_WAIT_S` at the latest. Object stores (S3) have no exclusive create here:
there every trial computes what it misses, as before.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import os
import socket
import time
import uuid
import weakref
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

logger = logging.getLogger(__name__)

Features = dict[str, torch.Tensor]  # {"prefix": S (N, L, D), "h0": h(0) (N, D)}


def model_fingerprint(clip: torch.nn.Module) -> str:
    """sha256 over the frozen CLIP state dict (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(clip.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# h(0)'s last block computes the read row only (backbone.block_rows): blobs whose h(0) came from
# the whole block differ at float rounding, so they are not read back as these
H0_PASS = "last-block-read-rows"


def items_hash(items: Sequence[Any]) -> str:
    """sha256 over the items' image paths and labels (Datum-like or strings)."""
    h = hashlib.sha256()
    for d in items:
        h.update(f"{getattr(d, 'impath', d)}|{getattr(d, 'label', '')}\n".encode())
    return h.hexdigest()


def compute_id(device: torch.device) -> str:
    """How features computed now on `device` are rounded: fp32 or the active autocast dtype.

    Part of every key, so a bf16 trial never feeds an fp32 trial (and CPU/GPU kernels, whose
    rounding differs, do not mix either). On CUDA it also holds the GPU's name and compute
    capability (which pick the kernels) and both TF32 flags: a cache shared between nodes then
    never mixes GPU architectures or TF32 and true fp32 features, so an fp32 cache stays bitwise.
    """
    from perl_core.factory import gpu_info, tf32_flags

    dt = torch.device(device).type
    mode = f"autocast-{torch.get_autocast_dtype(dt)}" if torch.is_autocast_enabled(dt) else "fp32"
    if dt != "cuda":  # CPU keys as before (the TF32 flags do not reach CPU kernels)
        return f"{dt}/{mode}"
    info, tf32 = gpu_info(device), tf32_flags()
    return (f"cuda/{mode}/{info['gpu']}/sm{info['gpu_capability']}/"
            f"tf32-matmul={int(tf32['tf32_matmul'])},cudnn={int(tf32['tf32_cudnn'])}")


def info_mtime(info: dict) -> float | None:
    """A file's modification time (epoch seconds) from an fsspec `info`/`ls(detail=True)` entry:
    local `mtime`, s3fs `LastModified` (a datetime), others `last_modified` / `created`."""
    for key in ("mtime", "LastModified", "last_modified", "created"):
        m = info.get(key)
        if m is None:
            continue
        if hasattr(m, "timestamp"):
            return m.timestamp()
        try:
            return float(m)
        except (TypeError, ValueError):
            return None
    return None


def _env() -> str:
    import PIL
    import torchvision

    return f"torch={torch.__version__},torchvision={torchvision.__version__},PIL={PIL.__version__}"


class StoredBlob(NamedTuple):
    """A blob as read (`FeatureCache.read`): tensors in the storage dtype on the CPU, the dtype
    each was computed in, and whether it was put as a single tensor."""
    tensors: dict[str, torch.Tensor]
    computed: dict[str, torch.dtype]
    single: bool


def restore(blob: StoredBlob | None, device: torch.device | None = None
            ) -> torch.Tensor | Features | None:
    """A read blob as `FeatureCache.get` returns it: copied to `device` (if any) first, then
    cast to the computed dtypes, so the copy moves the storage dtype's bytes."""
    if blob is None:
        return None
    out = {k: (t if device is None else t.to(device, non_blocking=True)).to(blob.computed[k])
           for k, t in blob.tensors.items()}
    return out["x"] if blob.single else out


class FeatureCache:
    RESCAN_EVERY = 64  # writes between two listings of the store (for the size cap)
    CLAIM_STALE_S = 120.0  # a holder silent this long (its heartbeat file) is taken as gone
    CLAIM_WAIT_S = 600.0  # the longest a trial waits for one claimed batch before computing it
    CLAIM_POLL_S = 0.05

    def __init__(self, root_url: str, max_bytes: int = 8 << 30, dtype: torch.dtype = torch.float16,
                 storage_options: dict | None = None):
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype={dtype} must be torch.float16, bfloat16 or float32")
        self.fs, self.root = fsspec.core.url_to_fs(root_url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.dtype = dtype
        self.hits = self.misses = self.corrupt = 0
        self.counts: collections.Counter[str] = collections.Counter()  # "<kind>/hit|miss"
        self._bytes: int | None = None  # store size at the last scan + what this object wrote
        self._writes = 0
        # model -> (parameter versions, fingerprint); weak keys: a freed model's id can be
        # reused by another one with other weights
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # claims: only where exclusive create exists (a local or shared POSIX file system)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.claims_enabled = "file" in protocols or "local" in protocols
        self.holder = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __repr__(self) -> str:
        return f"FeatureCache({self.root!r}, dtype={self.dtype}, hits={self.hits}, " \
               f"misses={self.misses})"

    def fingerprint(self, clip: torch.nn.Module) -> str:
        """`model_fingerprint(clip)`, memoized per module (an in-place change is noticed)."""
        versions = tuple(p._version for p in clip.parameters())
        memo = self._fingerprints.get(clip)
        if memo is None or memo[0] != versions:
            memo = (versions, model_fingerprint(clip))
            self._fingerprints[clip] = memo
        return memo[1]

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "corrupt": self.corrupt,
                **dict(sorted(self.counts.items()))}

    # ---- keys --------------------------------------------------------------------------------
    def key(self, **parts: Any) -> str:
        parts = {**parts, "storage_dtype": str(self.dtype)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def image_key(self, model: Any, *, dataset: str, split: str, transform: str,
                  items: Sequence[Any]) -> str:
        """Key of the image features of one batch (call inside the autocast context used to
        compute them). `items`: Datum-like or strings (training views add their seed)."""
        return self.key(kind="image", model=self.fingerprint(model.clip),
                        d0=model.vision_depths[0], dataset=dataset, split=split,
                        transform=transform, items=items_hash(items), h0=H0_PASS,
                        compute=compute_id(_device(model)), env=_env())

    def text_key(self, model: Any, tokens: torch.Tensor, *, dataset: str, template: str,
                 classnames: Sequence[str]) -> str:
        return self.key(kind="text", model=self.fingerprint(model.clip), d0=model.text_depths[0],
                        dataset=dataset, template=template,
                        classes=items_hash(list(classnames)),
                        tokens=hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest(),
                        # S_t is cut after the prompts' last EOS (PerlModel.text_prefix); blobs
                        # of full-context prefixes (before the cut) are not read back as such
                        text_prefix="eos-truncated", h0=H0_PASS,
                        compute=compute_id(_device(model)), env=f"torch={torch.__version__}")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{key}.safetensors"

    # ---- raw get/put -------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """exists() of each key; one listing of the store instead of a request per key when
        there are many (an epoch of ImageNet batches on s3 would be thousands of HEADs)."""
        if len(keys) <= 32:
            return [self.exists(k) for k in keys]
        names = {self.fs._strip_protocol(i["name"]).rstrip("/") for i in self._files()}
        return [self.fs._strip_protocol(self._path(k)) in names for k in keys]

    def get(self, key: str, device: torch.device | str | None = None
            ) -> torch.Tensor | Features | None:
        """The stored tensor (or dict of tensors, as put), on the CPU (or on `device`); None when
        absent/corrupt. With an accelerator `device` the blob travels in the storage dtype
        (pinned, non-blocking) and is cast back to its computed dtype there: half the bytes of
        an fp16 blob upcast on the CPU first, and the same values (a widening cast is exact)."""
        dev = None if device is None else torch.device(device)
        return restore(self.read(key, pin=dev is not None and dev.type == "cuda"), dev)

    def read(self, key: str, pin: bool = False) -> "StoredBlob | None":
        """The blob of `key` read and checked, its tensors still in the storage dtype on the CPU
        (pinned when `pin`); None when absent/corrupt. Only I/O and parsing: `cached_batches`
        runs it in a background thread. `restore` finishes it."""
        path = self._path(key)
        try:
            with self.fs.open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return None
        try:
            tensors = st_load(blob)
            meta = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])["__metadata__"]
            shapes, dtypes = json.loads(meta["shapes"]), json.loads(meta["dtypes"])
            if meta.get("key") != key or {k: list(t.shape) for k, t in tensors.items()} != shapes:
                raise ValueError("metadata mismatch")
            # the dtype it was computed in (what the uncached path would hand on); cast in restore
            computed = {k: getattr(torch, dtypes[k].removeprefix("torch.")) for k in tensors}
        except Exception as e:  # truncated / corrupt: a miss, and the bad file goes
            self.corrupt += 1
            logger.warning("feature cache: dropping unreadable blob %s (%s)", path, e)
            self._rm(path)
            return None
        try:
            self.fs.touch(path, truncate=False)  # LRU-ish: a hit refreshes the mtime
        except Exception:  # some filesystems (s3) cannot touch without truncating
            pass
        if pin:  # a pinned source makes the later non_blocking copy truly asynchronous
            tensors = {k: t.pin_memory() for k, t in tensors.items()}
        return StoredBlob(tensors, computed, meta.get("single") == "1")

    def put(self, key: str, x: torch.Tensor | Features) -> None:
        single = isinstance(x, torch.Tensor)
        tensors = {"x": x} if single else dict(x)
        dtypes = json.dumps({k: str(t.dtype) for k, t in tensors.items()})
        tensors = {k: t.detach().to("cpu", self.dtype).contiguous() for k, t in tensors.items()}
        blob = st_save(tensors, metadata={
            "key": key, "single": "1" if single else "0", "dtypes": dtypes,
            "shapes": json.dumps({k: list(t.shape) for k, t in tensors.items()})})
        path = self._path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as f:
            f.write(blob)
        self.fs.mv(tmp, path)
        # listing the whole store on every write is quadratic in the number of blobs: keep a
        # running total and rescan (other processes write too) every RESCAN_EVERY writes
        self._writes += 1
        if self._bytes is not None:
            self._bytes += len(blob)
        if self._bytes is None or self._bytes > self.max_bytes or \
                self._writes % self.RESCAN_EVERY == 0:
            self.evict()

    def _rounded(self, x: torch.Tensor | Features) -> torch.Tensor | Features:
        """What a later get() of x returns: rounded to the storage dtype, in x's dtype."""
        if isinstance(x, torch.Tensor):
            return x.detach().to(self.dtype).to(x.dtype)
        return {k: t.detach().to(self.dtype).to(t.dtype) for k, t in x.items()}

    def _count(self, kind: str, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        self.counts[f"{kind}/{'hit' if hit else 'miss'}"] += 1

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor | Features],
                       kind: str = "other") -> torch.Tensor | Features:
        t = self.get(key)
        if t is not None:
            self._count(kind, True)
            return t
        self._count(kind, False)
        x = compute()
        self.put(key, x)
        return self._rounded(x)

    # ---- claims (concurrent fills of one store) -----------------------------------------------
    def _claim_path(self, key: str) -> str:
        return f"{self._path(key)}.claim"

    def _heartbeat_path(self, holder: str) -> str:
        return f"{self.root}/holders/{holder}"

    def heartbeat(self) -> None:
        """Show that this holder is alive (its claims stay valid for CLAIM_STALE_S more)."""
        if self.claims_enabled:
            path = self._heartbeat_path(self.holder)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(str(time.time()))

    def claim(self, key: str) -> bool:
        """Try to become the one process computing `key`. True: compute it (then `put` and
        `release`); False: another live holder is computing it (`wait_for` it). Always True
        where claims are not available."""
        if not self.claims_enabled:
            return True
        path = self._claim_path(key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._claim_holder_alive(path):
                    return False
                self._rm(path)  # abandoned: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.holder)
            return True
        return True  # contended beyond reason: computing it again is always correct

    def release(self, key: str) -> None:
        """Drop this holder's claim of `key` (after `put`, or when giving up on it)."""
        if not self.claims_enabled:
            return
        path = self._claim_path(key)
        try:
            with open(path) as f:
                mine = f.read() == self.holder
            if mine:
                os.remove(path)
        except OSError:
            pass

    def _claim_holder_alive(self, claim_path: str) -> bool:
        try:
            with open(claim_path) as f:
                holder = f.read()
            made = os.stat(claim_path).st_mtime
        except OSError:
            return False  # released meanwhile
        parts = holder.rsplit("-", 2)  # <host>-<pid>-<nonce>; a host name may hold "-"
        host, pid = (parts[0], parts[1]) if len(parts) == 3 else ("", "")
        if host == socket.gethostname() and pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return False  # its process is gone
            except PermissionError:
                pass
        try:
            seen = os.stat(self._heartbeat_path(holder)).st_mtime
        except OSError:
            seen = made
        return time.time() - max(seen, made) < self.CLAIM_STALE_S

    def _forget_old_holders(self, age_s: float = 86400.0) -> None:
        if not self.claims_enabled:
            return
        folder = os.path.dirname(self._heartbeat_path(self.holder))
        try:
            names = os.listdir(folder)
        except OSError:
            return
        for name in names:
            try:
                if time.time() - os.stat(f"{folder}/{name}").st_mtime > age_s:
                    os.remove(f"{folder}/{name}")
            except OSError:
                pass

    def wait_for(self, key: str) -> torch.Tensor | Features | None:
        """The blob of a key another holder claimed, once written; None when that holder gave it
        up or is gone, or after CLAIM_WAIT_S (then the caller computes it)."""
        deadline = time.monotonic() + self.CLAIM_WAIT_S
        beat = time.monotonic()
        path = self._claim_path(key)
        while True:
            feats = self.get(key)  # None while absent (a write is a rename: never partial)
            if feats is not None:
                return feats
            if not os.path.exists(path) or not self._claim_holder_alive(path) \
                    or time.monotonic() > deadline:
                return self.get(key)  # written just before the claim went, or None
            if time.monotonic() > beat + 5.0:  # waiting is not being gone: keep our claims
                self.heartbeat()
                beat = time.monotonic()
            time.sleep(self.CLAIM_POLL_S)

    # ---- size cap ----------------------------------------------------------------------------
    def _files(self) -> list[dict]:
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return []
        return [i for p, i in found.items() if p.endswith(".safetensors")]

    def size_bytes(self) -> int:
        return sum(int(i.get("size") or 0) for i in self._files())

    def evict(self) -> int:
        """Remove the oldest blobs (by mtime) until the total is within max_bytes (and the
        heartbeat files of holders silent for a day)."""
        self._forget_old_holders()
        files = self._files()
        total = sum(int(i.get("size") or 0) for i in files)
        self._bytes = total
        if total <= self.max_bytes:
            return 0

        removed = 0
        for i in sorted(files, key=lambda i: info_mtime(i) or 0.0):
            if total <= self.max_bytes:
                break
            self._rm(i["name"])
            total -= int(i.get("size") or 0)
            removed += 1
        self._bytes = total
        return removed

    def _rm(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    # ---- PERL features -----------------------------------------------------------------------
    def image_features(self, model: Any, images: torch.Tensor, *, dataset: str, split: str,
                       transform: str, items: Sequence[Any]) -> Features:
        """{"prefix": S_v, "h0": h(0)} of `images` (the batch of `items`), cached."""
        key = self.image_key(model, dataset=dataset, split=split, transform=transform,
                             items=items)
        return self.get_or_compute(key, lambda: image_features(model, images), "image")

    def text_features(self, model: Any, tokens: torch.Tensor, *, dataset: str, template: str,
                      classnames: Sequence[str]) -> Features:
        """{"prefix": S_t, "h0": h(0)} of the prompts `tokens` (of `classnames`), cached."""
        key = self.text_key(model, tokens, dataset=dataset, template=template,
                            classnames=classnames)
        return self.get_or_compute(key, lambda: text_features(model, tokens), "text")

    def image_prefix(self, model: Any, images: torch.Tensor, **key: Any) -> torch.Tensor:
        """S_v only (see image_features)."""
        return self.image_features(model, images, **key)["prefix"]

    def text_prefix(self, model: Any, tokens: torch.Tensor, **key: Any) -> torch.Tensor:
        """S_t only (see text_features)."""
        return self.text_features(model, tokens, **key)["prefix"]


def _device(model: Any) -> torch.device:
    return next(model.clip.parameters()).device


@torch.no_grad()
def image_features(model: Any, images: torch.Tensor) -> Features:
    """The frozen part of the image side: S_v and h(0), computed (no cache)."""
    prefix = model.image_prefix(images)
    return {"prefix": prefix, "h0": model.image_zero_shot_state(prefix)}


@torch.no_grad()
def text_features(model: Any, tokens: torch.Tensor) -> Features:
    """The frozen part of the text side: S_t and h(0), computed (no cache)."""
    prefix = model.text_prefix(tokens)
    return {"prefix": prefix, "h0": model.text_zero_shot_state(prefix, tokens)}


def to_device(features: Features, device: torch.device) -> Features:
    return {k: t.to(device, non_blocking=True) for k, t in features.items()}


# blobs read ahead of the batch being used (each at most ~eval_batch_size x 197 x 768 x 4 bytes:
# ~77 MB of host memory at ViT-B/16, 128 images, fp32)
PREFETCH = 1


def cached_batches(cache: FeatureCache, keys: Sequence[str],
                   decode_misses: Callable[[list[int]], Iterable[Any]],
                   decode_one: Callable[[int], Any],
                   compute: Callable[[Any], Features], kind: str = "image",
                   device: torch.device | str | None = None) -> Iterator[Features]:
    """Features of batch i = 0..len(keys)-1, in order: read from `cache`, or computed.

    Only batches absent when this starts are decoded, all through one `decode_misses(indices)`
    iterable (a DataLoader over those batches: workers and prefetch still apply); a blob that
    vanishes or turns out corrupt afterwards is decoded in-process by `decode_one(i)`.
    `compute(decoded_batch)` gives the features of a decoded batch (then stored).
    On a local store the missing batches are claimed first; those another live process already
    claimed are waited for and read (counted as hits and as `<kind>/waited`), not computed again.

    Hits are read ahead: the next PREFETCH present blobs are read and parsed in a background
    thread while the caller works on the current batch (on a GPU that work is queued kernels, so
    a synchronous read would leave the device idle); with `device` each hit is copied there in
    the storage dtype and cast back on the device (`FeatureCache.get`). The values are the same
    either way.
    """
    present = cache.exists_many(keys)
    dev = None if device is None else torch.device(device)
    pin = dev is not None and dev.type == "cuda"
    mine: list[int] = []  # missing, claimed by us: decoded by the loader, in order
    theirs: set[int] = set()  # missing, being computed by another live holder
    for i, p in enumerate(present):
        if not p:
            if cache.claim(keys[i]):
                mine.append(i)
            else:
                theirs.add(i)
    outstanding = {keys[i] for i in mine}
    if mine:
        cache.heartbeat()
    decoded = iter(decode_misses(mine)) if mine else iter(())
    hits = [i for i, p in enumerate(present) if p]
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="feature-cache-read") \
        if hits else None
    ahead: dict[int, concurrent.futures.Future] = {}
    nxt = 0  # position in `hits` of the next blob to submit
    try:
        for i, key in enumerate(keys):
            while pool is not None and nxt < len(hits) and len(ahead) < PREFETCH + 1:
                ahead[hits[nxt]] = pool.submit(cache.read, keys[hits[nxt]], pin)
                nxt += 1
            feats = restore(ahead.pop(i).result(), dev) if present[i] else None
            if i in theirs:
                feats = cache.wait_for(key)
                if feats is not None:
                    cache.counts[f"{kind}/waited"] += 1
            if feats is not None:
                cache._count(kind, True)
                yield feats
                continue
            cache._count(kind, False)
            feats = compute(next(decoded) if key in outstanding else decode_one(i))
            cache.put(key, feats)
            if key in outstanding:
                cache.release(key)
                outstanding.discard(key)
                cache.heartbeat()
            yield cache._rounded(feats)
    finally:  # stopped early (an error, a kill): nobody must wait for what we will not write
        for key in outstanding:
            cache.release(key)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


@torch.no_grad()
def evaluate_cached(model: Any, items: Sequence[Any], classnames: Sequence[str], dataset_name: str,
                    cfg: Any, cache: FeatureCache, *, split: str = "test") -> dict[str, Any]:
    """`perl_core.evaluate.evaluate` with the frozen features read from / written to `cache`.

    Same metrics; with an fp32 cache the numbers equal the uncached path exactly. Image batches
    whose features are cached are not decoded at all (nor the Jacobian's images: their pixels
    are cached too).
    """
    from torch.utils.data import DataLoader, default_collate

    from perl_core.data.images import ImageListDataset
    from perl_core.data.transforms import eval_transform
    from perl_core.evaluate import (autocast, check_eval_inputs, class_text_tokens,
                                    decode_images, jacobian_metrics, model_device,
                                    loader_options)
    from perl_core.metrics import StepMetricAccumulator

    items, classnames = list(items), list(classnames)
    check_eval_inputs(items, classnames, dataset_name)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        tokens = class_text_tokens(model, classnames, dataset_name, cfg.template)
        chunks = []
        bs = max(1, cfg.eval_batch_size)
        for s in range(0, tokens.shape[0], bs):
            tk = tokens[s:s + bs].to(device)
            with autocast(cfg, device):
                f = to_device(cache.text_features(model, tk, dataset=dataset_name,
                                                  template=cfg.template,
                                                  classnames=classnames[s:s + bs]), device)
                chunks.append(model.text_from_prefix(f["prefix"], tk, all_steps=True,
                                                     h0=f["h0"]).float())
        text = torch.cat(chunks, dim=1)
        transform = eval_transform(model.image_size)
        dataset = ImageListDataset(items, transform)
        batches = [list(range(s, min(s + bs, len(items)))) for s in range(0, len(items), bs)]
        with autocast(cfg, device):
            keys = [cache.image_key(model, dataset=dataset_name, split=split,
                                    transform=repr(transform), items=[items[j] for j in b])
                    for b in batches]

        def decode_misses(which: list[int]) -> DataLoader:
            return DataLoader(dataset, batch_sampler=[batches[i] for i in which],
                              **loader_options(cfg.num_workers, device))

        def compute(batch: Any) -> Features:
            with autocast(cfg, device):
                return image_features(model, batch[0].to(device, non_blocking=True))

        acc = StepMetricAccumulator(num_classes=len(classnames))
        feats = cached_batches(cache, keys, decode_misses,
                               lambda i: default_collate([dataset[j] for j in batches[i]]),
                               compute, device=device)
        for b, f in zip(batches, feats):
            f = to_device(f, device)
            with autocast(cfg, device):
                image = model.image_from_prefix(f["prefix"], all_steps=True, h0=f["h0"])
            image = image.float()
            logits = model.logits(image, text)
            labels = torch.tensor([items[j].label for j in b])
            acc.update(logits, labels, image_steps=image, text_steps=text)
        # the Jacobian needs pixels (the gradient runs through the lower blocks): its few images
        # are cached as pixels, a function of (items, transform) only, so a hit decodes nothing
        def jacobian_pixels(chosen: list[Any]) -> torch.Tensor:
            key = cache.key(kind="pixels", dataset=dataset_name, split=split,
                            transform=repr(transform), items=items_hash(chosen), env=_env())
            return cache.get_or_compute(key, lambda: decode_images(chosen, model.image_size),
                                        "pixels")

        jacobian_metrics(model, items, text, cfg, acc, jacobian_pixels)
        out: dict[str, Any] = dict(acc.compute())
        out["per_class"] = acc.per_class(classnames)
    finally:
        model.train(was_training)
    return out


__all__ = ["FeatureCache", "model_fingerprint", "items_hash", "compute_id", "info_mtime",
           "evaluate_cached", "image_features", "text_features", "cached_batches", "to_device",
           "StoredBlob", "restore", "PREFETCH"]
