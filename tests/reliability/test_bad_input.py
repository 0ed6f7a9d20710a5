"""Bad input through the real CLI (`python -m pipeline.run` as a subprocess). The unit-level cases
are elsewhere: sweep YAML errors in tests/test_spec.py; missing data root, missing or malformed
split JSON, label out of range, class without images, corrupt / truncated / missing image files
and non-RGB modes in tests/test_data.py; shots per class in tests/test_fewshot.py; missing,
corrupt, other-architecture checkpoints and the QuickGELU guard in tests/test_model.py; a missing
checkpoint refused by preflight in tests/test_spec.py.

Here, what only the driver and its trials can show:
- a corrupt image in one dataset of a sweep: that cell is FAILED with a message naming the file,
  the other cell finishes, exit 1;
- shots larger than a class's training images, unwritable storage, an unreachable tracking
  server: refused before any work (exit 2, no MLflow store, no Ray), the message naming the key.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .conftest import child_runs, cli, free_port, sweep_yaml

pytestmark = pytest.mark.reliability


def _world_with_corrupt_image(world: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of the world (symlinks) where one ToyCounts *test* image is garbage: every test
    image is evaluated, so the trial meets it whatever the few-shot sample."""
    root = tmp / "corrupt_world"
    root.mkdir()
    for entry in world.iterdir():
        if entry.name != "toy_counts":
            (root / entry.name).symlink_to(entry)
    split = json.loads((world / "toy_counts" / "split_zhou_ToyCounts.json").read_text())
    rel = split["test"][0][0]
    src = world / "toy_counts" / "images"
    for f in src.rglob("*"):
        if f.is_file():
            dst = root / "toy_counts" / "images" / f.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(f)
    (root / "toy_counts" / "split_zhou_ToyCounts.json").symlink_to(
        world / "toy_counts" / "split_zhou_ToyCounts.json")
    bad = root / "toy_counts" / "images" / rel
    bad.unlink()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root, bad


def test_a_corrupt_image_fails_its_cell_naming_the_file(tmp_path, world, weights):
    root, bad = _world_with_corrupt_image(world, tmp_path)
    db = tmp_path / "mlflow.db"
    y = sweep_yaml(tmp_path / "corrupt.yaml", world=root, weights=weights,
                   storage=tmp_path / "runs", tracking=f"sqlite:///{db}", name="corrupt",
                   steps=(1,))
    rc, out = cli([str(y)], tmp_path / "run.log")
    assert rc == 1, out
    assert "1 finished, 0 skipped (already FINISHED), 1 failed" in out, out
    summary = out.split("=== corrupt:")[1]
    line = next(ln for ln in summary.splitlines() if "FAILED b2n/ToyCounts" in ln)
    assert bad.name in line, line  # the driver's summary names the file
    runs = {r["tags"]["cell"]: r for r in child_runs(db)}
    assert runs["b2n/ToyShapes/2shot/seed1/J7/K1"]["status"] == "FINISHED"
    failed = runs["b2n/ToyCounts/2shot/seed1/J7/K1"]
    assert failed["status"] == "FAILED"
    assert str(bad.relative_to(root)) in failed["tags"]["status_detail"], failed["tags"]


def _refused(tmp_path: Path, y: Path, *args: str) -> str:
    t0 = time.monotonic()
    rc, out = cli([str(y), *args], tmp_path / f"{y.stem}.log", timeout=120)
    assert rc == 2, out
    assert not (tmp_path / "mlflow.db").exists(), "a store was created before the refusal"
    assert "grid phase" not in out and "Started a local Ray" not in out, out
    assert "Traceback" not in out, out
    assert time.monotonic() - t0 < 60
    return out


def test_shots_above_the_available_images_are_refused_before_any_work(tmp_path, world, weights):
    # the world has 4 training images per class
    y = sweep_yaml(tmp_path / "shots.yaml", world=world, weights=weights,
                   storage=tmp_path / "runs", tracking=f"sqlite:///{tmp_path / 'mlflow.db'}",
                   name="shots", steps=(1,))
    y.write_text(y.read_text().replace("  shots: 2\n", "  shots: 8\n"))
    out = _refused(tmp_path, y)
    assert f"{y}: fixed.shots: ToyShapes: shots=8 but" in out, out
    assert "shots=8 but" in out and "ToyShapes" in out and "ToyCounts" in out, out
    assert "have fewer training images" in out and "(label 0: 4)" in out, out


def test_unwritable_storage_is_refused_before_any_work(tmp_path, world, weights):
    blocker = tmp_path / "a_file"
    blocker.write_text("storage cannot be a folder under a file")
    storage = blocker / "runs"  # not writable even for root (permission bits would be)
    y = sweep_yaml(tmp_path / "storage.yaml", world=world, weights=weights, storage=storage,
                   tracking=f"sqlite:///{tmp_path / 'mlflow.db'}", name="storage", steps=(1,))
    out = _refused(tmp_path, y)
    assert f"{y}: storage: storage {storage} is not writable (Not a directory)" in out, out
    assert blocker.read_text().startswith("storage cannot")


def test_an_unreachable_tracking_server_is_refused_before_any_work(tmp_path, world, weights):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    y = sweep_yaml(tmp_path / "uri.yaml", world=world, weights=weights,
                   storage=tmp_path / "runs", tracking=url, name="uri", steps=(1,))
    t0 = time.monotonic()
    out = _refused(tmp_path, y)
    assert f"MLflow tracking at {url} is unreachable" in out and "tracking_uri" in out, out
    assert not (tmp_path / "runs").exists()
    print(f"\nunreachable tracking server refused after {time.monotonic() - t0:.0f} s")
