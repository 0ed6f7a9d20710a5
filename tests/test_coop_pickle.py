"""CoOp's `split_fewshot/shot_K-seed_S.pkl` (and ImageNet's `preprocessed.pkl`) as the few-shot
source (`fewshot_source: coop_pickle`), read by a restricted unpickler.

The pickles are made the way CoOp makes them: real instances of a class named `Datum` in a module
named `dassl.data.datasets.base_dataset` (injected into sys.modules; its body is Dassl's, less the
file check), dumped with `pickle.dump(..., protocol=pickle.HIGHEST_PROTOCOL)`, with absolute paths
of another machine. The real OxfordPets split and cross_modal_adaptation's CoOp selections are
read from `<repo>/../shared/data/coop_real` when present.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import pickletools
import random
import shutil
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest

from perl_core.config import TrainConfig
from perl_core.data import coop_pickle as cp
from perl_core.data.coop import DatasetError, load_splits
from perl_core.data.fewshot import fewshot_splits, subsample_classes
from perl_core.data.registry import DatasetSpec, get_spec, register
from perl_core.protocol import resolve_task

COOP_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "coop_real"
TOY = register(DatasetSpec(name="PickleToy", dataset_dir="pickle_toy", image_dir="images",
                           loader="split_json", split_file="split_zhou_PickleToy.json",
                           template="a photo of a {}.", num_classes=6))
ELSEWHERE = "/home/alice/CoOp/data"  # the data root of the machine that wrote the pickles


@pytest.fixture
def dassl(monkeypatch):
    """Dassl's module path with its Datum class, as CoOp's pickles reference it."""
    names = ["dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset"]
    mods = {n: types.ModuleType(n) for n in names}

    class Datum:  # Dassl's class body (dassl/data/datasets/base_dataset.py), less check_isfile
        def __init__(self, impath="", label=0, domain=0, classname=""):
            assert isinstance(impath, str)
            self._impath = impath
            self._label = label
            self._domain = domain
            self._classname = classname

        @property
        def impath(self):
            return self._impath

        @property
        def label(self):
            return self._label

    Datum.__module__, Datum.__qualname__ = names[-1], "Datum"
    mods[names[-1]].Datum = Datum
    for n in names:
        monkeypatch.setitem(sys.modules, n, mods[n])
    return Datum


def write_toy(root: Path) -> tuple[Path, object]:
    """A 6-class split JSON (labels interleaved), no images: loaders read the JSON only."""
    rng = random.Random(0)
    split = {}
    for name, n in (("train", 8), ("val", 3), ("test", 2)):
        items = [[f"c{y}/{name}_{i}.png", y, f"class_{y}"] for y in range(6) for i in range(n)]
        rng.shuffle(items)
        split[name] = items
    d = root / TOY.dataset_dir
    d.mkdir(parents=True)
    (d / TOY.split_file).write_text(json.dumps(split))
    return d, load_splits(TOY, str(root))


def coop_pickle(path: Path, data: dict, protocol: int = pickle.HIGHEST_PROTOCOL) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # CoOp: pickle.dump(data, file, protocol=HIGHEST_PROTOCOL)
        pickle.dump(data, f, protocol=protocol)
    return path.read_bytes()


def as_dassl(Datum, items, splits, prefix=ELSEWHERE, sep="/"):
    """Dassl Datums of our items, with `prefix`/<dataset_dir>/<image_dir>/<relpath> paths."""
    spec = get_spec(splits.dataset)
    parts = [prefix, spec.dataset_dir, *([spec.image_dir] if spec.image_dir else [])]
    return [Datum(sep.join([*parts, splits.relpath(d).replace("/", sep)]), d.label, 0,
                  d.classname) for d in items]


def other_picks(splits, shots, seed):
    """A Dassl-style pick that is not ours for `seed` (CoOp's would differ on another
    listing): the file, not our sampler, must decide."""
    picks = fewshot_splits(splits, shots, seed + 100)
    assert picks.train != fewshot_splits(splits, shots, seed).train
    return picks


# ------------------------------------------------------------------------------------------------
# reading what CoOp writes


@pytest.mark.parametrize("protocol", [pickle.HIGHEST_PROTOCOL, 2, 0])
def test_reads_the_pickle_coop_writes(tmp_path, dassl, protocol):
    folder, splits = write_toy(tmp_path)
    picks = other_picks(splits, 4, 1)
    raw = coop_pickle(folder / "split_fewshot" / "shot_4-seed_1.pkl",
                      {"train": as_dassl(dassl, picks.train, splits),
                       "val": as_dassl(dassl, picks.val, splits)}, protocol)
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    if protocol >= 2:  # Dassl's Datum: NEWOBJ + BUILD of its __dict__, one global (the class)
        assert {"NEWOBJ", "BUILD"} <= ops
    else:  # copyreg._reconstructor(Datum, object, None) + BUILD
        assert b"_reconstructor" in raw and "BUILD" in ops
    got = cp.coop_fewshot_splits(splits, str(tmp_path), 4, 1)
    assert got.train == picks.train and got.val == picks.val  # the file's items, in its order
    assert all(d.impath.startswith(splits.image_root + os.sep) for d in got.train)  # re-rooted
    assert got.test == splits.test and got.classnames == splits.classnames


@pytest.mark.parametrize("smuggled", ["system", "exec", "ordered_dict"])
def test_refuses_any_other_global_and_runs_nothing(tmp_path, dassl, monkeypatch, smuggled):
    folder, splits = write_toy(tmp_path)
    marker = tmp_path / "ran"

    class Payload:  # what a crafted file would run on pickle.load
        def __reduce__(self):
            if smuggled == "system":
                return os.system, (f"touch {marker}",)
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    payload = OrderedDict(a=1) if smuggled == "ordered_dict" else Payload()
    train = as_dassl(dassl, fewshot_splits(splits, 2, 1).train, splits)
    url = folder / "split_fewshot" / "shot_2-seed_1.pkl"
    coop_pickle(url, {"train": [*train[:2], payload, *train[2:]], "val": []})
    expected = {"system": f"{os.system.__module__}.system", "exec": "builtins.exec",
                "ordered_dict": "collections.OrderedDict"}[smuggled]
    with pytest.raises(DatasetError, match=rf"{url}: refused to load the global {expected}"):
        cp.coop_fewshot_splits(splits, str(tmp_path), 2, 1)
    assert not marker.exists()
    # a Datum of another module is another global too
    fork = types.ModuleType("my_fork.datasets")
    fork.Datum = dassl
    monkeypatch.setitem(sys.modules, "my_fork", types.ModuleType("my_fork"))
    monkeypatch.setitem(sys.modules, "my_fork.datasets", fork)
    monkeypatch.setattr(dassl, "__module__", "my_fork.datasets")
    coop_pickle(url, {"train": train, "val": []})
    with pytest.raises(DatasetError, match=r"refused to load the global my_fork\.datasets\.Datum"):
        cp.load_datum_pickle(str(url))


@pytest.mark.parametrize("raw", [
    b"ccopyreg\n_reconstructor\n(cbuiltins\nobject\ncbuiltins\nobject\nNtR.",  # not a Datum
    b"ccopyreg\n_reconstructor\n(dS'x'\nI1\nsb.",  # BUILD onto the allowed function itself
    b"cbuiltins\nobject\n(dS'x'\nI1\nsb.",  # ... onto the allowed class
])
def test_allowed_globals_rebuild_nothing_else(tmp_path, raw):
    import copyreg

    url = tmp_path / "crafted.pkl"
    url.write_bytes(raw)
    with pytest.raises(DatasetError, match=rf"{url}: not a readable CoOp few-shot pickle"):
        cp.load_datum_pickle(str(url))
    assert not hasattr(copyreg._reconstructor, "x") and not hasattr(object, "x")


def test_reroots_paths_of_another_machine(tmp_path, dassl):
    folder, splits = write_toy(tmp_path)
    picks = other_picks(splits, 2, 3)
    url = folder / "split_fewshot" / "shot_2-seed_3.pkl"
    # Windows, and a POSIX root that itself contains a folder named like the dataset's
    for prefix, sep in ((r"C:\Users\bob\data", "\\"), ("/mnt/pickle_toy/data", "/")):
        coop_pickle(url, {"train": as_dassl(dassl, picks.train, splits, prefix, sep),
                          "val": as_dassl(dassl, picks.val, splits, prefix, sep)})
        got = cp.coop_fewshot_splits(splits, str(tmp_path), 2, 3)
        assert got.train == picks.train and got.val == picks.val
    assert cp.relpath_candidates(r"D:\x\pickle_toy\images\c1\a.png", "pickle_toy", "images") \
        == ["c1/a.png"]
    assert cp.relpath_candidates("/d/pickle_toy/c1/a.png", "pickle_toy", "images") == []


def test_checks_each_item_against_the_split(tmp_path, dassl):
    folder, splits = write_toy(tmp_path)
    picks = fewshot_splits(splits, 2, 1)
    url = folder / "split_fewshot" / "shot_2-seed_1.pkl"
    train, val = as_dassl(dassl, picks.train, splits), as_dassl(dassl, picks.val, splits)

    def fails(match, **data):
        coop_pickle(url, {"train": train, "val": val, **data})
        with pytest.raises(DatasetError, match=match):
            cp.coop_fewshot_splits(splits, str(tmp_path), 2, 1)

    gone = dassl(f"{ELSEWHERE}/pickle_toy/images/c9/train_0.png", 1, 0, "class_1")
    fails(rf"{url}: train\[3\] = '.*c9/train_0.png' is not an item of the PickleToy train split",
          train=[*train[:3], gone])
    d = train[0]
    fails(rf"train\[0\] = .* has label {(d._label + 1) % 6} .* but the PickleToy train split has "
          rf".* as label {d._label}",
          train=[dassl(d._impath, (d._label + 1) % 6, 0, f"class_{(d._label + 1) % 6}")])
    fails(r"train\[0\] = .* has label .*'kitten'", train=[dassl(d._impath, d._label, 0, "kitten")])
    fails(r"train\[0\] = '/elsewhere/c1/a.png': no 'pickle_toy/images/' in the path",
          train=[dassl("/elsewhere/c1/a.png", 1, 0, "class_1")])
    fails(r"val\[0\] = .* is not an item of the PickleToy val split", val=train[:1])
    fails(r"train has more than 2 items for 6 class\(es\)", train=as_dassl(
        dassl, fewshot_splits(splits, 3, 1).train, splits))
    coop_pickle(url, {"train": train})
    with pytest.raises(DatasetError, match=r"expected the keys 'train' and 'val', found \['train'"):
        cp.coop_fewshot_splits(splits, str(tmp_path), 2, 1)
    url.write_bytes(pickle.dumps({"train": train})[:-5])
    with pytest.raises(DatasetError, match=rf"{url}: not a readable CoOp few-shot pickle"):
        cp.coop_fewshot_splits(splits, str(tmp_path), 2, 1)
    coop_pickle(url, {"train": [{"_impath": d._impath}], "val": []})
    with pytest.raises(DatasetError, match=r"train\[0\] is not a Dassl Datum"):
        cp.coop_fewshot_splits(splits, str(tmp_path), 2, 1)


def test_missing_file_says_how_to_get_one(tmp_path):
    _, splits = write_toy(tmp_path)
    path = tmp_path / "pickle_toy" / "split_fewshot" / "shot_16-seed_2.pkl"
    with pytest.raises(FileNotFoundError, match=rf"{path} not found\. CoOp .*NUM_SHOTS 16 and "
                                                r"SEED 2.*fewshot_source: sample"):
        cp.coop_fewshot_splits(splits, str(tmp_path), 16, 2)
    assert cp.coop_fewshot_splits(splits, str(tmp_path), 0, 2) == splits  # all images, no file


# ------------------------------------------------------------------------------------------------
# ImageNet: train only (val is the test set); preprocessed.pkl gives CoOp's listing order


def write_imagenet(root: Path) -> object:
    d = root / "imagenet"
    wnids = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
    (d).mkdir(parents=True)
    (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids.items()))
    for split, n in (("train", 6), ("val", 2)):
        for w in wnids:
            (d / "images" / split / w).mkdir(parents=True)
            for i in range(n):
                (d / "images" / split / w / f"{w}_{i}.JPEG").write_bytes(b"")
    return load_splits(dataclasses.replace(get_spec("ImageNet"), num_classes=3), str(root))


def test_imagenet_shot_file_and_preprocessed_order(tmp_path, dassl):
    splits = write_imagenet(tmp_path)
    # CoOp's listing: os.listdir order (here: a shuffle), saved in preprocessed.pkl
    listing = list(splits.train)
    random.Random(5).shuffle(listing)
    listing.sort(key=lambda d: d.label)  # CoOp walks the sorted wnid folders
    coop_pickle(tmp_path / "imagenet" / "preprocessed.pkl",
                {"train": as_dassl(dassl, listing, splits),
                 "test": as_dassl(dassl, splits.test, splits)})
    state = random.getstate()
    try:  # CoOp: set_random_seed(1), then Dassl's random.sample per class of its listing
        random.seed(1)
        expected = [d for y in range(3) for d in random.sample(
            [x for x in listing if x.label == y], 2)]
    finally:
        random.setstate(state)
    got = cp.coop_fewshot_splits(splits, str(tmp_path), 2, 1)
    assert got.train == tuple(expected) and got.val == splits.test
    assert got.train != fewshot_splits(splits, 2, 1).train  # the sorted listing picks others
    # a shot file wins over preprocessed.pkl; ImageNet's has no val (CoOp writes train only)
    coop_pickle(tmp_path / "imagenet" / "split_fewshot" / "shot_2-seed_1.pkl",
                {"train": as_dassl(dassl, listing[:1] + listing[6:7], splits)})
    got = cp.coop_fewshot_splits(splits, str(tmp_path), 2, 1)
    assert got.train == (listing[0], listing[6]) and got.val == splits.test
    coop_pickle(tmp_path / "imagenet" / "preprocessed.pkl",
                {"train": as_dassl(dassl, listing[1:], splits)})
    with pytest.raises(DatasetError, match=r"preprocessed\.pkl: its train list has 17 items .* "
                                           r"ours 18"):
        cp.coop_order(splits, str(tmp_path / "imagenet" / "preprocessed.pkl"))


# ------------------------------------------------------------------------------------------------
# wiring: resolve_task and the config hash


def test_resolve_task_reads_the_pickle_then_subsamples(tmp_path, world, dassl):
    name = "ToyShapes"
    spec = get_spec(name)
    (tmp_path / spec.dataset_dir).mkdir()
    shutil.copy(Path(world) / spec.dataset_dir / spec.split_file,
                tmp_path / spec.dataset_dir / spec.split_file)
    splits = load_splits(name, str(tmp_path))
    picks = other_picks(splits, 2, 1)
    coop_pickle(tmp_path / spec.dataset_dir / "split_fewshot" / "shot_2-seed_1.pkl",
                {"train": as_dassl(dassl, picks.train, splits),
                 "val": as_dassl(dassl, picks.val, splits)})
    cfg = TrainConfig(dataset=name, data_root=str(tmp_path), shots=2, seed=1,
                      fewshot_source="coop_pickle")
    t = resolve_task(cfg)
    base = subsample_classes(picks, "base")  # after the few-shot pick, as CoOp's order
    assert t.train_items == list(base.train) and t.train_items
    assert {e.name: e.items for e in t.evalsets}["val"] == list(base.val)
    assert resolve_task(cfg.replace(fewshot_source="sample")).train_items != t.train_items
    with pytest.raises(FileNotFoundError, match="shot_2-seed_2.pkl not found"):
        resolve_task(cfg.replace(seed=2))


def test_sweep_preflight_names_each_missing_pickle(tmp_path, dassl):
    from pipeline.spec import SpecError, expand, parse_spec, preflight, train_view_key

    _, splits = write_toy(tmp_path / "coop")
    coop_pickle(tmp_path / "coop" / "pickle_toy" / "split_fewshot" / "shot_2-seed_1.pkl",
                {"train": [], "val": []})
    text = (f"name: p\nexperiment: perl/p\nstorage: {tmp_path}/runs\nfixed:\n"
            f"  dataset: PickleToy\n  data_root: {tmp_path}/coop\n  shots: 2\n"
            f"  fewshot_source: coop_pickle\ngrid:\n  seed: [1, 2, 3]\n")
    spec = parse_spec(text)
    with pytest.raises(SpecError) as e:
        preflight(spec, expand(spec))
    msg = str(e.value)
    assert "fixed.fewshot_source" in msg and "shot_2-seed_1.pkl" not in msg
    assert "shot_2-seed_2.pkl not found" in msg and "shot_2-seed_3.pkl not found" in msg
    preflight(spec, [c for c in expand(spec) if c.seed == 1])  # its file is there
    gone = parse_spec(text.replace(f"{tmp_path}/coop", f"{tmp_path}/elsewhere"))
    preflight(gone, expand(gone))  # no data here: those cells fail with their own reason
    cfg = expand(spec)[0]  # training views of the two sources are not the same views
    assert train_view_key(cfg) != train_view_key(cfg.replace(fewshot_source="sample"))


def test_config_hash_of_the_few_shot_source():
    cfg = TrainConfig(dataset="ToyShapes", arch="perl-tiny", pretrained="embedded", num_steps=2)
    # "sample" keeps the hash pinned before the field existed (tests/test_spec.py)
    assert cfg.replace(fewshot_source="sample").config_hash() == "dcc835716867d195"
    other = cfg.replace(fewshot_source="coop_pickle")
    assert other.config_hash() != cfg.config_hash()
    assert TrainConfig.from_dict(other.to_dict()).config_hash() == other.config_hash()


# ------------------------------------------------------------------------------------------------
# the real OxfordPets split and CoOp's picks from it (cross_modal_adaptation's index files)


@pytest.mark.skipif(not (COOP_REAL / "indices" / "oxford_pets").is_dir(),
                    reason="shared CoOp split files not available")
def test_real_pets_selection_as_a_coop_pickle(tmp_path, dassl):
    (tmp_path / "oxford_pets").mkdir()
    shutil.copy(COOP_REAL / "splits" / "split_zhou_OxfordPets.json", tmp_path / "oxford_pets")
    splits = load_splits("OxfordPets", str(tmp_path))
    index = json.loads((COOP_REAL / "indices" / "oxford_pets" / "shot_4-seed_2.json").read_text())
    # their paths are relative to their data root ("./data/oxford_pets/images/...")
    coop_pickle(tmp_path / "oxford_pets" / "split_fewshot" / "shot_4-seed_2.pkl",
                {k: [dassl(e["impath"], e["label"], 0, e["classname"]) for e in index[k]["data"]]
                 for k in ("train", "val")})
    got = cp.coop_fewshot_splits(splits, str(tmp_path), 4, 2)
    assert got.train == tuple(splits.train[i] for i in index["train"]["indices"])
    assert got.val == tuple(splits.val[i] for i in index["val"]["indices"])
    assert got == fewshot_splits(splits, 4, 2)  # and our sampler picks the same
