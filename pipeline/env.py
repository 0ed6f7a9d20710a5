"""Code and environment identity, recorded as tags on every run.

- `code_version()`: the git commit of the submitted code, whether the tree was dirty, and the
  fingerprint of the method code (`code_fingerprint`, what "same code version" means). Computed
  on the *driver* (the submitting side), because Ray's working-dir upload usually leaves `.git`
  behind: `$GIT_SHA` (set by the submitter, e.g. `--runtime-env-json '{"env_vars": {"GIT_SHA":
  ...}}'`) wins, then `git` in the repository, else "unknown". `$GIT_DIRTY` likewise.
- `versions()`: torch / open_clip / ray / mlflow / optuna versions; `device_info(device)`: CUDA,
  the trial's device, GPU name and compute capability, and the TF32 flags (in the trial).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNKNOWN = "unknown"
_PACKAGES = {"torch": "torch", "open_clip": "open_clip_torch", "ray": "ray", "mlflow": "mlflow",
             "optuna": "optuna"}


@dataclass(frozen=True)
class CodeVersion:
    sha: str  # 40-hex commit, or "unknown"
    dirty: str  # "true" / "false" / "unknown" (strings: they become MLflow tags)
    version: str  # the `code_version` tag: hash of the code that determines a result
    # (`code_fingerprint`); a finished run of another version is not done for this code


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def code_version() -> CodeVersion:
    sha = os.environ.get("GIT_SHA", "").strip()
    dirty = os.environ.get("GIT_DIRTY", "").strip().lower()
    if not sha and (REPO / ".git").exists():
        sha = (_git("rev-parse", "HEAD") or "").strip()
        if sha and not dirty:
            status = _git("status", "--porcelain", "--untracked-files=no")
            dirty = UNKNOWN if status is None else str(bool(status.strip())).lower()
    if dirty not in ("true", "false"):
        dirty = UNKNOWN
    return CodeVersion(sha=sha or UNKNOWN, dirty=dirty, version=code_fingerprint())


# What can change a trial's numbers: the method package's code, model configs and shipped
# weights. Tests, docs, sweeps and the pipeline itself cannot.
_FINGERPRINT_SUFFIXES = (".py", ".json", ".safetensors")


def code_fingerprint(root: Path | None = None) -> str:
    """sha256 (16 hex) over perl_core's sources, configs and embedded weights.

    This is the "code version" a finished run must match to be skipped: unlike the git commit it
    ignores commits that touch only tests, docs or the pipeline, it sees uncommitted edits, and it
    can be computed from a `ray job submit` upload that carries no `.git`.
    """
    root = Path(root or REPO / "perl_core")
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()
                       and p.suffix in _FINGERPRINT_SUFFIXES and "__pycache__" not in p.parts):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Package versions as tags `version.<name>` (metadata only: nothing heavy is imported)."""
    out = {}
    for name, dist in _PACKAGES.items():
        try:
            out[f"version.{name}"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[f"version.{name}"] = UNKNOWN
    return out


def device_info(device: object = None) -> dict[str, str]:
    """CUDA / GPU of the current process (call inside the trial: the driver may have no GPU).

    device: the trial's resolved device (`pipeline.trainable.trial_device`): `device_resolved`,
    `gpu` and `gpu_capability` are then of that device ("none" on the CPU, even on a GPU node);
    None: the process's first visible GPU, as before. Always: the TF32 flags as set now
    (`tf32_matmul`, `tf32_cudnn`; the trial sets them for its precision before the tags).
    """
    import torch

    from perl_core.factory import gpu_info, tf32_flags

    info = {"version.cuda": str(torch.version.cuda or "none")}
    if device is not None:
        info["device_resolved"] = str(device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
    info.update(gpu_info(device))
    if torch.cuda.is_available():
        info["version.cudnn"] = str(torch.backends.cudnn.version())
    info.update({k: str(v).lower() for k, v in tf32_flags().items()})
    return info


__all__ = ["CodeVersion", "code_version", "versions", "device_info", "REPO"]
