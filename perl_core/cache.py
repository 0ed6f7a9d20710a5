"""FeatureCache: an explicit, fsspec-backed store of frozen-prefix features (safetensors blobs).

What is cached: the outputs of the frozen lower blocks, which no projector touches:
  (a) image prefixes S_v = blocks[:J](embed(x)) for evaluation batches, shared by every trial with
      the same CLIP weights and J (all K, seeds, lr, anchor weights, variants with the same d0);
  (b) text prefixes S_t of the class prompts.
The zero-shot state h(0) is recomputed from S_v by `image_from_prefix(..., all_steps=True)`
(it is the upper blocks without thoughts; cheap next to the prefix's J blocks).

Keys are sha256 over (model_fingerprint(clip), tower, inject depth d0, dataset, split,
transform id, template, item-list hash, storage dtype). Nothing is cached implicitly: callers
pass a FeatureCache object (`fit(..., cache=...)`, `evaluate_task(..., cache=...)`).

Storage dtype: `dtype=torch.float16` (default) halves the space and changes results at the fp16
rounding level; `dtype=torch.float32` stores the prefix bit-exactly (the cached path then gives
exactly the uncached numbers in fp32). Writes go to a temporary name then are renamed; a blob
that fails to parse or has the wrong shape/dtype is treated as a miss and recomputed. A size cap
(`max_bytes`) evicts the oldest files by mtime (a hit touches the file: LRU-ish).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Any, Callable, Sequence

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

logger = logging.getLogger(__name__)

_FINGERPRINTS: "dict[int, tuple[Any, str]]" = {}


def model_fingerprint(clip: torch.nn.Module) -> str:
    """sha256 over the frozen CLIP state dict (names, shapes, dtypes, bytes).

    Memoized per module object (weights are frozen; the memo is keyed by id and holds the module's
    parameter version counters, so an in-place change is noticed).
    """
    versions = tuple(p._version for p in clip.parameters())
    memo = _FINGERPRINTS.get(id(clip))
    if memo is not None and memo[0] == versions:
        return memo[1]
    h = hashlib.sha256()
    for name, t in sorted(clip.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    fp = h.hexdigest()
    _FINGERPRINTS[id(clip)] = (versions, fp)
    return fp


def items_hash(items: Sequence[Any]) -> str:
    """sha256 over the items' image paths and labels (Datum-like or strings)."""
    h = hashlib.sha256()
    for d in items:
        h.update(f"{getattr(d, 'impath', d)}|{getattr(d, 'label', '')}\n".encode())
    return h.hexdigest()


class FeatureCache:
    def __init__(self, root_url: str, max_bytes: int = 8 << 30, dtype: torch.dtype = torch.float16,
                 storage_options: dict | None = None):
        self.fs, self.root = fsspec.core.url_to_fs(root_url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.dtype = dtype
        self.hits = self.misses = self.corrupt = 0

    # ---- keys --------------------------------------------------------------------------------
    def key(self, **parts: Any) -> str:
        parts = {**parts, "storage_dtype": str(self.dtype)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> str:
        return f"{self.root}/{key[:2]}/{key}.safetensors"

    # ---- raw get/put -------------------------------------------------------------------------
    def get(self, key: str) -> torch.Tensor | None:
        path = self._path(key)
        try:
            with self.fs.open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return None
        try:
            tensors = st_load(blob)
            t = tensors["x"]
            meta = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])["__metadata__"]
            if meta.get("key") != key or list(t.shape) != json.loads(meta["shape"]):
                raise ValueError("metadata mismatch")
        except Exception as e:  # truncated / corrupt: a miss, and the bad file goes
            self.corrupt += 1
            logger.warning("feature cache: dropping unreadable blob %s (%s)", path, e)
            self._rm(path)
            return None
        try:
            self.fs.touch(path, truncate=False)  # LRU-ish: a hit refreshes the mtime
        except Exception:  # some filesystems (s3) cannot touch without truncating
            pass
        return t

    def put(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().to("cpu", self.dtype).contiguous()
        blob = st_save({"x": x}, metadata={"key": key, "shape": json.dumps(list(x.shape))})
        path = self._path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with self.fs.open(tmp, "wb") as f:
            f.write(blob)
        self.fs.mv(tmp, path)
        self.evict()

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        t = self.get(key)
        if t is not None:
            self.hits += 1
            return t
        self.misses += 1
        x = compute()
        self.put(key, x)
        return x.detach().to(self.dtype)

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
        """Remove the oldest blobs (by mtime) until the total is within max_bytes."""
        files = self._files()
        total = sum(int(i.get("size") or 0) for i in files)
        if total <= self.max_bytes:
            return 0

        def mtime(i: dict) -> float:
            m = i.get("mtime", i.get("LastModified", i.get("created", 0)))
            return m.timestamp() if hasattr(m, "timestamp") else float(m or 0)

        removed = 0
        for i in sorted(files, key=mtime):
            if total <= self.max_bytes:
                break
            self._rm(i["name"])
            total -= int(i.get("size") or 0)
            removed += 1
        return removed

    def _rm(self, path: str) -> None:
        try:
            self.fs.rm(path)
        except FileNotFoundError:
            pass

    # ---- PERL prefixes -----------------------------------------------------------------------
    def image_prefix(self, model: Any, images: torch.Tensor, *, dataset: str, split: str,
                     transform: str, items: Sequence[Any]) -> torch.Tensor:
        """S_v for `images` (the batch of `items`), from the cache or computed and stored."""
        key = self.key(kind="image_prefix", model=model_fingerprint(model.clip),
                       d0=model.vision_depths[0], dataset=dataset, split=split,
                       transform=transform, items=items_hash(items))
        return self.get_or_compute(key, lambda: model.image_prefix(images))

    def text_prefix(self, model: Any, tokens: torch.Tensor, *, dataset: str, template: str,
                    classnames: Sequence[str]) -> torch.Tensor:
        key = self.key(kind="text_prefix", model=model_fingerprint(model.clip),
                       d0=model.text_depths[0], dataset=dataset, template=template,
                       classes=items_hash(list(classnames)),
                       tokens=hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest())
        return self.get_or_compute(key, lambda: model.text_prefix(tokens))


@torch.no_grad()
def evaluate_cached(model: Any, items: Sequence[Any], classnames: Sequence[str], dataset_name: str,
                    cfg: Any, cache: FeatureCache, *, split: str = "test") -> dict[str, Any]:
    """`perl_core.evaluate.evaluate` with the frozen prefixes read from / written to `cache`.

    Same metrics; with an fp32 cache the numbers equal the uncached path exactly.
    """
    from torch.utils.data import DataLoader

    from perl_core.data.images import ImageListDataset
    from perl_core.data.transforms import eval_transform
    from perl_core.evaluate import autocast, class_text_tokens, model_device
    from perl_core.metrics import StepMetricAccumulator

    if not items or not classnames:
        raise ValueError(f"{dataset_name}: nothing to evaluate")
    items = list(items)
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
                pre = cache.text_prefix(model, tk, dataset=dataset_name, template=cfg.template,
                                        classnames=classnames[s:s + bs]).to(device)
                chunks.append(model.text_from_prefix(pre, tk, all_steps=True).float())
        text = torch.cat(chunks, dim=1)
        transform = eval_transform(model.image_size)
        loader = DataLoader(ImageListDataset(items, transform), batch_size=bs, shuffle=False,
                            num_workers=cfg.num_workers)
        acc = StepMetricAccumulator(num_classes=len(classnames))
        for b, (images, labels) in enumerate(loader):
            batch_items = items[b * bs:(b + 1) * bs]
            with autocast(cfg, device):
                pre = cache.image_prefix(model, images.to(device), dataset=dataset_name,
                                         split=split, transform=repr(transform),
                                         items=batch_items).to(device)
                image = model.image_from_prefix(pre, all_steps=True)
            image = image.float()
            logits = model.logits(image, text)
            acc.update(logits, torch.as_tensor(labels), image[0], image[-1])
        out: dict[str, Any] = dict(acc.compute())
        out["per_class"] = acc.per_class(list(classnames))
    finally:
        model.train(was_training)
    return out


__all__ = ["FeatureCache", "model_fingerprint", "items_hash", "evaluate_cached"]
