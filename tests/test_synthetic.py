"""The synthetic world: CoOp layout, determinism, caching, base/novel word coverage, registry."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import pytest
from PIL import Image

from perl_core.data import synthetic as syn

SMALL = {"train": 2, "val": 1, "test": 2}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("world")
    t0 = time.time()
    manifest = syn.generate_world(root, seed=0)
    assert manifest["generated"]
    return root, time.time() - t0


def _split(root: Path, name: str) -> dict:
    return json.loads(syn.split_path(root, name).read_text())


def test_generation_is_fast_and_cached(world):
    root, seconds = world
    # ~8k PNGs take ~6 s on one free core; the bound leaves room for a loaded CI machine
    assert seconds < 90, f"generating the world took {seconds:.0f} s"
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.json")}
    t0 = time.time()
    again = syn.generate_world(root, seed=0)
    assert not again["generated"] and time.time() - t0 < 2
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.json")} == before
    assert set(again["datasets"]) == {d.name for d in syn.DATASETS}


def test_same_seed_identical_files(tmp_path, world):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for root, seed in ((a, 0), (b, 0), (c, 1)):
        syn.generate_world(root, seed=seed, datasets=["ToyShapes", "ToyWorldSketch"], sizes=SMALL)
    for name in ("ToyShapes", "ToyWorldSketch"):
        assert _sha(syn.split_path(a, name)) == _sha(syn.split_path(b, name))
        assert _sha(syn.split_path(a, name)) != _sha(syn.split_path(c, name))
    imgs = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert imgs and imgs == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all(_sha(a / p) == _sha(b / p) for p in imgs)
    assert any(_sha(a / p) != _sha(c / p) for p in imgs)
    # an image is keyed by its identity: a small world holds the full world's first images
    full = world[0]
    assert all(_sha(a / p) == _sha(full / p) for p in imgs[:20])


def test_force_and_changed_request_regenerate(tmp_path):
    m1 = syn.generate_world(tmp_path, datasets=["ToyCounts"], sizes=SMALL)
    stale = tmp_path / "toy_counts" / "images" / "stale.png"
    stale.write_bytes(b"x")
    assert not syn.generate_world(tmp_path, datasets=["ToyCounts"], sizes=SMALL)["generated"]
    assert syn.generate_world(tmp_path, datasets=["ToyCounts"], sizes=SMALL,
                              force=True)["generated"]
    assert not stale.exists()  # the dataset folder is rewritten, not patched
    m2 = syn.generate_world(tmp_path, seed=3, datasets=["ToyCounts"], sizes=SMALL)
    assert m2["generated"] and m2["seed"] == 3 and m1["seed"] == 0


def test_split_structure(world):
    root, _ = world
    for d in syn.DATASETS:
        split = _split(root, d.name)
        assert set(split) == {"train", "val", "test"}
        names = d.classnames()
        assert len(names) == len(set(names)) == len(d.cells())
        img_root = syn.split_path(root, d.name).parent / syn.IMAGE_DIR
        for s, items in split.items():
            for rel, label, cname in items:
                assert isinstance(rel, str) and isinstance(label, int)
                assert not Path(rel).is_absolute()
                assert names[label] == cname
            if items:  # CoOp's files are not sorted by label
                labels = [it[1] for it in items]
                assert labels != sorted(labels)
        tests = {it[1] for it in split["test"]}
        assert tests == set(range(len(names))), d.name
        if d.test_only:
            assert split["train"] == split["val"] == [] and d.source == "ToyWorld"
        else:
            assert {it[1] for it in split["train"]} == set(range(len(names)))
            per_class = [sum(1 for it in split["train"] if it[1] == y) for y in range(len(names))]
            assert min(per_class) >= 16  # enough for 16-shot sampling
        rel = split["test"][0][0]
        with Image.open(img_root / rel) as im:
            assert im.mode == "RGB" and im.size == (syn.IMAGE_SIZE, syn.IMAGE_SIZE)


def test_shifted_variants_share_the_source_classes(world):
    root, _ = world
    src = {(it[1], it[2]) for it in _split(root, "ToyWorld")["test"]}
    for d in syn.DATASETS:
        if d.test_only:
            assert syn.toy_dataset(d.source).classnames() == d.classnames()
            assert {(it[1], it[2]) for it in _split(root, d.name)["test"]} == src


@pytest.mark.parametrize("d", [d for d in syn.DATASETS if not d.test_only], ids=lambda d: d.name)
def test_every_word_in_both_halves(d):
    names = d.classnames()
    m = math.ceil(len(names) / 2)  # CoOp: labels[:ceil(n/2)] are base
    assert m == d.num_base()
    base = {w for n in names[:m] for w in n.split()}
    novel = {w for n in names[m:] for w in n.split()}
    assert base == novel, (base ^ novel)
    assert not set(names[:m]) & set(names[m:])


def test_held_out_are_the_novel_classes():
    held = syn.held_out_scenes()
    assert set(held) == set(syn.BASE2NOVEL)
    for name, scenes in held.items():
        d = syn.toy_dataset(name)
        assert [syn.classname(s) for s in scenes] == d.classnames()[d.num_base():]
        assert all(syn.is_held_out(s) for s in scenes)
        assert not any(syn.is_held_out(d.scene(y)) for y in range(d.num_base()))


def test_registered_specs():
    from perl_core.data.registry import _REGISTRY  # get_spec also needs the real benchmarks

    for d in syn.DATASETS:
        spec = _REGISTRY[d.name]
        assert spec.synthetic and spec.loader == "split_json"
        assert spec.split_file == f"split_zhou_{d.name}.json" and spec.image_dir == "images"
        assert spec.num_classes == len(d.cells()) and spec.test_only == d.test_only
        assert spec.source == d.source and "{}" in spec.template


def test_get_spec_finds_the_toy_datasets():
    pytest.importorskip("perl_core.data.benchmarks")
    from perl_core.data.registry import get_spec, list_datasets

    assert get_spec("ToyShapes").synthetic
    assert get_spec("toy_world_sketch").name == "ToyWorldSketch"
    assert set(list_datasets(synthetic=True)) >= {d.name for d in syn.DATASETS}


def test_loads_through_the_coop_loader(world):
    coop = pytest.importorskip("perl_core.data.coop")
    root, _ = world
    for d in syn.DATASETS:
        splits = coop.load_splits(d.name, str(root))
        assert list(splits.classnames) == d.classnames()
        split = _split(root, d.name)
        assert len(splits.test) == len(split["test"])
        if not d.test_only:
            assert len(splits.train) == len(split["train"]) and len(splits.val) == len(split["val"])
        first = splits.test[0]
        assert Path(first.impath).is_file() and first.classname == d.classnames()[first.label]


def test_cli(tmp_path, capsys):
    assert syn.main(["--root", str(tmp_path), "--datasets", "ToyPatterns"]) == 0
    assert syn.split_path(tmp_path, "ToyPatterns").is_file()
    assert syn.main(["--root", str(tmp_path), "--datasets", "ToyPatterns"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_clear_errors(tmp_path):
    with pytest.raises(KeyError, match="not a synthetic dataset|unknown dataset"):
        syn.generate_world(tmp_path, datasets=["NoSuchSet"])
    with pytest.raises(ValueError, match="unknown split"):
        syn.generate_world(tmp_path, datasets=["ToyShapes"], sizes={"tarin": 3})
