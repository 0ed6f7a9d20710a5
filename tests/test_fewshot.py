"""Few-shot sampling and base/novel subsampling against Dassl/CoOp.

- an independent, straightforward transcription of Dassl's `generate_fewshot_dataset` (module
  `random` seeded once, `defaultdict` grouping, `random.sample`) on made-up splits with interleaved
  labels and a class smaller than k;
- the third-party few-shot index files of linzhiqiu/cross_modal_adaptation (real CoOp splits),
  read from `<repo>/../shared/data/coop_real` (skipped when absent);
- the base/novel class and test-image counts of the notes (data_protocol.md §1.2);
- the CLI's JSON index file.
"""

from __future__ import annotations

import functools
import json
import random
from collections import defaultdict
from pathlib import Path

import pytest

from perl_core.data import fewshot as fs
from perl_core.data.coop import Datum, Splits, load_splits, read_split_file
from perl_core.data.registry import get_spec

COOP_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "coop_real"
# index folder -> (canonical dataset, CoOp cfg name used in the split file's name)
REAL = {
    "oxford_pets": ("OxfordPets", "OxfordPets"),
    "dtd": ("DTD", "DescribableTextures"),
    "eurosat": ("EuroSAT", "EuroSAT"),
    "caltech101": ("Caltech101", "Caltech101"),
    "oxford_flowers": ("Flowers102", "OxfordFlowers"),
    "ucf101": ("UCF101", "UCF101"),
    "stanford_cars": ("StanfordCars", "StanfordCars"),
}
needs_real = pytest.mark.skipif(not (COOP_REAL / "splits").is_dir(),
                                reason="shared CoOp split files not available")


# ------------------------------------------------------------------------------------------------
# the independent reference: Dassl's code path, written out plainly


def dassl_reference(train, val, shots, seed):
    state = random.getstate()
    try:
        random.seed(seed)  # CoOp's set_random_seed(seed) at process start

        def generate(data_source, num_shots):
            tracker = defaultdict(list)
            for item in data_source:
                tracker[item.label].append(item)
            dataset = []
            for label, items in tracker.items():
                if len(items) >= num_shots:
                    sampled = random.sample(items, num_shots)
                else:
                    sampled = items
                dataset.extend(sampled)
            return dataset

        return generate(train, shots), generate(val, min(shots, 4))
    finally:
        random.setstate(state)


def made_up_splits(seed=0, n_classes=6, small_class=4, small_size=3):
    """Interleaved labels (first appearance not sorted), one class smaller than k."""
    rng = random.Random(seed)
    counts = {y: rng.randint(10, 25) for y in range(n_classes)}
    counts[small_class] = small_size

    def split(name, scale):
        labels = [y for y, c in counts.items() for _ in range(max(1, c // scale))]
        rng.shuffle(labels)
        return tuple(Datum(f"/img/{name}/{i:03d}.png", y, f"class_{y}")
                     for i, y in enumerate(labels))

    train, val = split("train", 1), split("val", 3)
    test = split("test", 2)
    return Splits(train, val, test, tuple(f"class_{y}" for y in range(n_classes)),
                  dataset="MadeUp", image_root="/img")


def test_made_up_split_is_interleaved_with_a_small_class():
    s = made_up_splits()
    labels = [d.label for d in s.train]
    first_seen = list(dict.fromkeys(labels))
    assert first_seen != sorted(first_seen)
    assert any(a != b for a, b in zip(labels, labels[1:]))
    assert labels.count(4) == 3


@pytest.mark.parametrize("shots", [1, 2, 4, 5, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3, 17])
def test_matches_independent_dassl(shots, seed):
    s = made_up_splits(seed)
    ref_train, ref_val = dassl_reference(s.train, s.val, shots, seed)
    got = fs.fewshot_splits(s, shots, seed)
    assert list(got.train) == ref_train
    assert list(got.val) == ref_val
    assert got.test == s.test and got.classnames == s.classnames
    # the small class is taken whole, in file order
    small = [d for d in s.train if d.label == 4]
    if shots > len(small):
        assert [d for d in got.train if d.label == 4] == small


def test_own_rng_leaves_global_random_alone():
    s = made_up_splits()
    random.seed(123)
    before = random.getstate()
    fs.fewshot_splits(s, 4, 1)
    assert random.getstate() == before


def test_sample_fewshot_on_items_and_dicts():
    s = made_up_splits()
    a = fs.sample_fewshot(s.train, 3, random.Random(5))
    dicts = [{"impath": d.impath, "label": d.label, "classname": d.classname} for d in s.train]
    b = fs.sample_fewshot(dicts, 3, random.Random(5))
    assert [d.impath for d in a] == [d["impath"] for d in b]


def test_shots_below_one_keep_everything():
    s = made_up_splits()
    assert fs.fewshot_splits(s, 0, 1) == s


def test_check_shots_names_the_class():
    s = made_up_splits()
    fs.check_shots(s, 3)
    with pytest.raises(ValueError, match=r"shots=4 .*'class_4' \(label 4: 3\)"):
        fs.check_shots(s, 4)


def test_imagenet_style_val_is_test_samples_train_only():
    s = made_up_splits()
    s = Splits(s.train, s.test, s.test, s.classnames, val_is_test=True)
    ref_train, _ = dassl_reference(s.train, [], 4, 2)
    got = fs.fewshot_splits(s, 4, 2)
    assert list(got.train) == ref_train and got.val == s.test
    base = fs.subsample_classes(got, "base")
    assert base.val == base.test and base.val_is_test


# ------------------------------------------------------------------------------------------------
# base / novel


def test_subsample_base_new_all():
    s = made_up_splits(n_classes=7)
    f = fs.fewshot_splits(s, 4, 1)
    base, new = fs.subsample_classes(f, "base"), fs.subsample_classes(f, "new")
    assert fs.subsample_classes(f, "all") is f
    assert base.classnames == tuple(f"class_{y}" for y in range(4))  # ceil(7/2)
    assert new.classnames == tuple(f"class_{y}" for y in range(4, 7))
    for part, offset in ((base, 0), (new, 4)):
        for split in (part.train, part.val, part.test):
            assert all(part.classnames[d.label] == f"class_{d.label + offset}" for d in split)
    # the base few-shot set is the all-class set filtered (shots drawn over all classes first)
    assert [d.impath for d in base.train] == [d.impath for d in f.train if d.label < 4]
    assert len(base.test) + len(new.test) == len(s.test)
    assert fs.subsample_classes(f, "novel") == new
    with pytest.raises(ValueError, match="subsample='half'"):
        fs.subsample_classes(f, "half")


@functools.lru_cache(maxsize=None)
def real_splits(folder):
    canonical, cfg = REAL[folder]
    return read_split_file(str(COOP_REAL / "splits" / f"split_zhou_{cfg}.json"),
                           "/coop/images", get_spec(canonical))


# notes §1.2: classes, train/val/test, base/novel classes, base/novel test images
COUNTS = {
    "caltech101": (100, 4128, 1649, 2465, 50, 50, 1549, 916),
    "oxford_pets": (37, 2944, 736, 3669, 19, 18, 1881, 1788),
    "stanford_cars": (196, 6509, 1635, 8041, 98, 98, 4002, 4039),
    "oxford_flowers": (102, 4093, 1633, 2463, 51, 51, 1053, 1410),
    "dtd": (47, 2820, 1128, 1692, 24, 23, 864, 828),
    "eurosat": (10, 13500, 5400, 8100, 5, 5, 4200, 3900),
    "ucf101": (101, 7639, 1898, 3783, 51, 50, 1934, 1849),
}


@needs_real
@pytest.mark.parametrize("folder", sorted(COUNTS))
def test_real_split_sizes_and_base_novel_counts(folder):
    s = real_splits(folder)
    n, ntr, nva, nte, nb, nn, tb, tn = COUNTS[folder]
    assert (len(s.classnames), len(s.train), len(s.val), len(s.test)) == (n, ntr, nva, nte)
    f = fs.fewshot_splits(s, 16, 1)
    base, new = fs.subsample_classes(f, "base"), fs.subsample_classes(f, "new")
    assert (base.num_classes, new.num_classes) == (nb, nn)
    assert (len(base.test), len(new.test)) == (tb, tn)
    assert len(base.train) == 16 * nb and len(new.train) == 16 * nn
    assert base.classnames + new.classnames == s.classnames


@needs_real
def test_real_class_names():
    caltech = real_splits("caltech101")
    assert caltech.classnames[:4] == ("face", "leopard", "motorbike", "accordion")
    assert real_splits("eurosat").classnames[0] == "Annual Crop Land"
    assert "Apply_Eye_Makeup" in real_splits("ucf101").classnames


@needs_real
@pytest.mark.parametrize("folder", sorted(REAL))
@pytest.mark.parametrize("shots,seed", [(1, 1), (2, 3), (4, 2), (8, 1), (16, 3)])
def test_matches_third_party_index_files(folder, shots, seed):
    index_file = COOP_REAL / "indices" / folder / f"shot_{shots}-seed_{seed}.json"
    ref = json.loads(index_file.read_text())
    s = real_splits(folder)
    got = fs.fewshot_indices(s, shots, seed)
    assert got["train"] == ref["train"]["indices"]
    assert got["val"] == ref["val"]["indices"]
    # and the entries themselves (impath = "./data/<image folder>/" + relpath)
    f = fs.fewshot_splits(s, shots, seed)
    for split in ("train", "val"):
        mine = getattr(f, split)
        theirs = ref[split]["data"]
        assert len(mine) == len(theirs)
        for d, t in zip(mine, theirs):
            assert t["impath"].endswith("/" + s.relpath(d))
            assert (d.label, d.classname) == (t["label"], t["classname"])
    # and the independent transcription agrees too
    ref_train, ref_val = dassl_reference(s.train, s.val, shots, seed)
    assert list(f.train) == ref_train and list(f.val) == ref_val


# ------------------------------------------------------------------------------------------------
# CLI


def write_eurosat_like(root: Path) -> dict:
    """A made-up 10-class split in EuroSAT's layout (only the split file: no image is opened)."""
    rng = random.Random(7)
    names = [f"land type {y}" for y in range(10)]
    split = {}
    for name, per in (("train", 6), ("val", 3), ("test", 4)):
        entries = [[f"C{y}/{name}_{y}_{i}.jpg", y, names[y]] for y in range(10) for i in range(per)]
        rng.shuffle(entries)
        split[name] = entries
    d = root / "eurosat"
    d.mkdir(parents=True)
    (d / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    return split


def test_cli_writes_the_index_file(tmp_path, capsys):
    split = write_eurosat_like(tmp_path / "data")
    out = tmp_path / "idx" / "eurosat_4shot_seed2_base.json"
    assert fs.main(["--data-root", str(tmp_path / "data"), "--dataset", "eurosat", "--shots", "4",
                    "--seed", "2", "--subsample", "base", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    ref_train, ref_val = dassl_reference(
        [Datum(*e) for e in split["train"]], [Datum(*e) for e in split["val"]], 4, 2)
    base = {y for y in range(5)}
    assert got["dataset"] == "EuroSAT" and got["shots"] == 4 and got["seed"] == 2
    assert got["subsample"] == "base" and got["classnames"] == [f"land type {y}" for y in range(5)]
    assert got["train"]["data"] == [[d.impath, d.label, d.classname] for d in ref_train
                                    if d.label in base]
    assert got["val"]["data"] == [[d.impath, d.label, d.classname] for d in ref_val
                                  if d.label in base]
    for block, entries in ((got["train"], split["train"]), (got["val"], split["val"])):
        assert [entries[i] for i in block["indices"]] == block["data"]
    assert got["num_test"] == 5 * 4 and got["val_is_test"] is False

    # stdout without --out; "all" relabels nothing
    assert fs.main(["--data-root", str(tmp_path / "data"), "--dataset", "EuroSAT",
                    "--shots", "2", "--seed", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["subsample"] == "all" and len(printed["train"]["indices"]) == 20
    assert len(printed["classnames"]) == 10


def test_cli_check_shots_fails_clearly(tmp_path):
    write_eurosat_like(tmp_path)
    with pytest.raises(ValueError, match="shots=7 but 10 class"):
        fs.main(["--data-root", str(tmp_path), "--dataset", "EuroSAT", "--shots", "7",
                 "--check-shots"])


def test_fewshot_index_matches_load_splits_path(tmp_path):
    write_eurosat_like(tmp_path)
    s = load_splits("EuroSAT", str(tmp_path))
    idx = fs.fewshot_index(s, 2, 3, "new")
    new = fs.subsample_classes(fs.fewshot_splits(s, 2, 3), "new")
    assert [s.relpath(d) for d in new.train] == [e[0] for e in idx["train"]["data"]]
    assert [d.label for d in new.train] == [e[1] for e in idx["train"]["data"]]
    assert new.train[0].impath == str(tmp_path / "eurosat" / "2750" / idx["train"]["data"][0][0])
