"""Training checkpoints without pickle: tensors in safetensors, everything else as JSON.

`fit` talks to a checkpoint through two methods (see docs/architecture.md):

    load() -> dict | None      the last saved state, or None to start from scratch
    save(state: dict) -> None

`state` is a nested structure of dicts, lists, tuples, tensors, numpy arrays and JSON scalars
(projector and optimizer state dicts, RNG states, data position, history). `pack_state` splits it
into a flat {key: tensor} mapping plus a JSON document in which every tensor is replaced by a
reference; `unpack_state` reverses it exactly (dtypes, shapes, int dict keys and tuples survive,
which `optimizer.load_state_dict` and `random.setstate` need).

`DirCheckpoint(path)` stores one file, `<path>/checkpoint.safetensors`, with the JSON in the
safetensors metadata: a single file replaced atomically (write + os.replace), so a process killed
mid-save leaves the previous checkpoint intact. `MemoryCheckpoint` keeps the state in memory
(tests, and callers that persist it some other way).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "perl-checkpoint/1"
FILENAME = "checkpoint.safetensors"
_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__")


class Checkpoint(Protocol):
    def load(self) -> dict | None: ...

    def save(self, state: dict) -> None: ...


def pack_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """state -> (tensors, JSON-able document referencing them by key)."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(x: Any, where: str) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            # clone: safetensors refuses shared/non-contiguous storage, and the caller's tensors
            # keep changing after save() returns
            tensors[key] = x.detach().cpu().contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            key = f"t{len(tensors)}"
            tensors[key] = torch.from_numpy(x.astype(np.int64) if x.dtype.kind in "ui"
                                            else np.ascontiguousarray(x)).clone()
            return {"__ndarray__": key, "dtype": x.dtype.str}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                if any(k in _MARKERS for k in x):
                    raise ValueError(f"checkpoint state at {where} uses a reserved key "
                                     f"({[k for k in x if k in _MARKERS]})")
                return {k: enc(v, f"{where}.{k}") for k, v in x.items()}
            return {"__dict__": [[enc(k, where), enc(v, f"{where}[{k!r}]")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"checkpoint state at {where} holds a {type(x).__name__}, which is "
                        f"neither a tensor, an array nor a JSON value")

    return tensors, enc(state, "state")


def unpack_state(tensors: dict[str, torch.Tensor], doc: Any) -> Any:
    """Inverse of `pack_state`."""

    def dec(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__ndarray__" in x:
                return tensors[x["__ndarray__"]].numpy().astype(np.dtype(x["dtype"]))
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
            if "__dict__" in x:
                return {dec(k): dec(v) for k, v in x["__dict__"]}
            return {k: dec(v) for k, v in x.items()}
        if isinstance(x, list):
            return [dec(v) for v in x]
        return x

    return dec(doc)


class DirCheckpoint:
    """A checkpoint kept in a directory as `checkpoint.safetensors` (tensors + JSON metadata)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @property
    def file(self) -> Path:
        return self.path / FILENAME

    def exists(self) -> bool:
        return self.file.is_file()

    def save(self, state: dict) -> None:
        tensors, doc = pack_state(state)
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_name(f".{FILENAME}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "state": json.dumps(doc)})
        os.replace(tmp, self.file)  # atomic on POSIX: readers see the old or the new file

    def load(self) -> dict | None:
        if not self.exists():
            return None
        try:
            with safe_open(str(self.file), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated or foreign file
            raise ValueError(f"cannot read checkpoint {self.file}: {type(e).__name__}: {e}") from e
        if meta.get("format") != FORMAT or "state" not in meta:
            raise ValueError(f"{self.file} is not a PERL checkpoint (format "
                             f"{meta.get('format')!r}, expected {FORMAT!r})")
        return unpack_state(tensors, json.loads(meta["state"]))

    def __repr__(self) -> str:
        return f"DirCheckpoint({str(self.path)!r})"


class MemoryCheckpoint:
    """Keeps the last saved state in memory, through the same pack/unpack round trip as files
    (so what it returns is exactly what a DirCheckpoint would); counts saves."""

    def __init__(self) -> None:
        self._packed: tuple[dict[str, torch.Tensor], str] | None = None
        self.saves = 0

    def save(self, state: dict) -> None:
        tensors, doc = pack_state(state)
        self._packed = (tensors, json.dumps(doc))
        self.saves += 1

    def load(self) -> dict | None:
        if self._packed is None:
            return None
        tensors, doc = self._packed
        return unpack_state({k: v.clone() for k, v in tensors.items()}, json.loads(doc))


__all__ = ["Checkpoint", "DirCheckpoint", "MemoryCheckpoint", "pack_state", "unpack_state"]
