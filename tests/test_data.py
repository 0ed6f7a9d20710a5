"""The CoOp data layer on tiny datasets written in tmp_path (real PNG/JPEG files).

Loaders (split_json, fgvc, imagenet, imagenet_variant), their clear errors, the benchmark
registry, images (every PIL mode to RGB, corrupt files named), templates and transforms.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from perl_core.data import storage
from perl_core.data.benchmarks import BENCHMARKS
from perl_core.data.coop import DatasetError, Datum, load_splits
from perl_core.data.images import ImageListDataset, ImageReadError, load_image
from perl_core.data.registry import DatasetSpec, get_spec
from perl_core.data.templates import class_prompts
from perl_core.data.transforms import CLIP_MEAN, CLIP_STD, eval_transform, train_transform

CLASSES = ["cat", "big_dog", "bird"]


def write_image(path: Path, mode: str = "RGB", fmt: str = "PNG", size=(10, 7), value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = {"L": value, "RGB": (value, 20, 200), "RGBA": (value, 20, 200, 128),
              "CMYK": (10, value, 30, 0), "I;16": value * 257, "P": value}[mode]
    img = Image.new(mode, size, colour)
    kwargs = {"transparency": 0} if mode == "P" else {}
    img.save(path, format=fmt, **kwargs)


TINY = DatasetSpec(name="Tiny", dataset_dir="tiny", image_dir="images",
                   template="a photo of a {}, tiny.", split_file="split_zhou_Tiny.json",
                   num_classes=3)


def write_split_dataset(root: Path, spec: DatasetSpec = TINY, per=(3, 2, 2)) -> dict:
    """CoOp split_json layout with interleaved labels; every listed image exists."""
    split = {}
    for name, n in zip(("train", "val", "test"), per):
        entries = [[f"{c}/{name}_{i}.png", y, c] for i in range(n) for y, c in enumerate(CLASSES)]
        split[name] = entries[1:] + entries[:1]  # first appearance is not label order
        for rel, _, _ in entries:
            write_image(root / spec.dataset_dir / spec.image_dir / rel)
    (root / spec.dataset_dir / spec.split_file).write_text(json.dumps(split))
    return split


# ------------------------------------------------------------------------------------------------
# registry


def test_fifteen_benchmarks_with_coop_layout():
    assert len(BENCHMARKS) == 15
    rows = {
        "ImageNet": ("imagenet", "images", "imagenet", None, 1000),
        "Caltech101": ("caltech-101", "101_ObjectCategories", "split_json",
                       "split_zhou_Caltech101.json", 100),
        "OxfordPets": ("oxford_pets", "images", "split_json", "split_zhou_OxfordPets.json", 37),
        "StanfordCars": ("stanford_cars", "", "split_json", "split_zhou_StanfordCars.json", 196),
        "Flowers102": ("oxford_flowers", "jpg", "split_json", "split_zhou_OxfordFlowers.json", 102),
        "Food101": ("food-101", "images", "split_json", "split_zhou_Food101.json", 101),
        "FGVCAircraft": ("fgvc_aircraft", "images", "fgvc", None, 100),
        "SUN397": ("sun397", "SUN397", "split_json", "split_zhou_SUN397.json", 397),
        "DTD": ("dtd", "images", "split_json", "split_zhou_DescribableTextures.json", 47),
        "EuroSAT": ("eurosat", "2750", "split_json", "split_zhou_EuroSAT.json", 10),
        "UCF101": ("ucf101", "UCF-101-midframes", "split_json", "split_zhou_UCF101.json", 101),
        "ImageNetV2": ("imagenetv2", "imagenetv2-matched-frequency-format-val",
                       "imagenet_variant", None, 1000),
        "ImageNetSketch": ("imagenet-sketch", "images", "imagenet_variant", None, 1000),
        "ImageNetA": ("imagenet-adversarial", "imagenet-a", "imagenet_variant", None, 200),
        "ImageNetR": ("imagenet-rendition", "imagenet-r", "imagenet_variant", None, 200),
    }
    for name, (d, img, loader, split_file, n) in rows.items():
        s = get_spec(name)
        assert (s.dataset_dir, s.image_dir, s.loader, s.split_file, s.num_classes) == \
            (d, img, loader, split_file, n), name
        assert not s.synthetic and "{}" in s.template
        is_variant = name in ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
        assert s.test_only == is_variant and s.source == ("ImageNet" if is_variant else None)
    for alias, name in [("OxfordFlowers", "Flowers102"), ("DescribableTextures", "DTD"),
                        ("oxford_flowers", "Flowers102"), ("caltech-101", "Caltech101"),
                        ("fgvc_aircraft", "FGVCAircraft"), ("imagenet-a", "ImageNetA"),
                        ("imagenet-sketch", "ImageNetSketch"), ("imagenetv2", "ImageNetV2"),
                        ("imagenet-rendition", "ImageNetR"), ("eurosat", "EuroSAT"),
                        ("food-101", "Food101"), ("sun397", "SUN397"), ("pets", "OxfordPets")]:
        assert get_spec(alias).name == name
    assert get_spec("DTD").template == "{} texture."
    assert get_spec("UCF101").template == "a photo of a person doing {}."
    with pytest.raises(KeyError, match="unknown dataset 'Flowerz'"):
        get_spec("Flowerz")


# ------------------------------------------------------------------------------------------------
# split_json


def test_split_json_loads(tmp_path, monkeypatch):
    split = write_split_dataset(tmp_path)
    s = load_splits(TINY, str(tmp_path))
    assert s.classnames == tuple(CLASSES) and s.dataset == "Tiny" and not s.val_is_test
    assert (len(s.train), len(s.val), len(s.test)) == (9, 6, 6)
    assert [d.label for d in s.train] == [e[1] for e in split["train"]]  # file order kept
    first = s.train[0]
    assert first == Datum(str(tmp_path / "tiny" / "images" / split["train"][0][0]),
                          split["train"][0][1], split["train"][0][2])
    assert Path(first.impath).is_file() and s.relpath(first) == split["train"][0][0]
    # a relative data root gives absolute paths
    monkeypatch.chdir(tmp_path)
    assert load_splits(TINY, ".").train[0].impath == first.impath
    assert load_splits(TINY, storage.join("tiny", "..")).train[0].impath == first.impath


def test_split_json_does_not_open_images(tmp_path):
    write_split_dataset(tmp_path)
    for p in (tmp_path / "tiny" / "images").rglob("*.png"):
        p.unlink()
    assert len(load_splits(TINY, str(tmp_path)).train) == 9


def test_test_only_split_json(tmp_path):
    spec = dataclasses.replace(TINY, test_only=True)
    write_split_dataset(tmp_path, spec, per=(0, 0, 2))
    s = load_splits(spec, str(tmp_path))
    assert s.train == () and len(s.test) == 6 and s.classnames == tuple(CLASSES)


def test_missing_root_folder_and_split_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data root not found.*nowhere"):
        load_splits(TINY, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="data_root is empty"):
        load_splits(TINY, "")
    with pytest.raises(FileNotFoundError, match=r"dataset folder not found: .*tiny"):
        load_splits(TINY, str(tmp_path))
    (tmp_path / "tiny").mkdir()
    with pytest.raises(FileNotFoundError, match=r"split file not found: .*split_zhou_Tiny\.json"):
        load_splits(TINY, str(tmp_path))


def bad_split(tmp_path, content) -> str:
    d = tmp_path / "tiny"
    d.mkdir(exist_ok=True)
    (d / "split_zhou_Tiny.json").write_text(content if isinstance(content, str)
                                            else json.dumps(content))
    return str(tmp_path)


def good_split():
    return {"train": [["a/1.png", 0, "cat"], ["b/1.png", 1, "big_dog"], ["c/1.png", 2, "bird"]],
            "val": [["a/2.png", 0, "cat"]], "test": [["c/3.png", 2, "bird"]]}


@pytest.mark.parametrize("content,pattern", [
    ('{"train": [["a.png", 0, "cat"]', r"split_zhou_Tiny\.json: malformed JSON at line 1"),
    ([["a.png", 0, "cat"]], r"split_zhou_Tiny\.json: expected a JSON object .*got list"),
    ({"train": [], "test": []}, r"split_zhou_Tiny\.json: missing key\(s\) \['val'\]"),
    ({"train": {}, "val": [], "test": []}, r"'train' must be a list"),
    ({**good_split(), "val": [["a/2.png", 0]]},
     r"split_zhou_Tiny\.json: val\[0\] = \['a/2.png', 0\]: expected \[relative_path"),
    ({**good_split(), "test": [["a/2.png", "0", "cat"]]}, r"test\[0\] = .*expected"),
    ({**good_split(), "test": [["a/2.png", 0, "cat"], ["x.png", 7, "cow"]]},
     r"split_zhou_Tiny\.json: test\[1\] = \['x.png', 7, 'cow'\]: label 7 is out of range 0\.\.2 "
     r"\(Tiny has 3 classes"),
    ({**good_split(), "train": good_split()["train"] + [["d.png", -1, "cow"]]},
     r"train\[3\] = .*label -1 is out of range"),
    ({**good_split(), "val": [["a/2.png", 0, "kitten"]]},
     r"val\[0\] = \['a/2.png', 0, 'kitten'\]: label 0 is named 'kitten', but train\[0\] = "
     r"\['a/1.png', 0, 'cat'\] names it 'cat'"),
    ({**good_split(), "train": good_split()["train"][:2]},
     r"split_zhou_Tiny\.json: class 2 \('bird'\) has no images in the train split \(Tiny expects "
     r"3 classes"),
])
def test_split_json_errors_name_file_and_entry(tmp_path, content, pattern):
    root = bad_split(tmp_path, content)
    with pytest.raises(DatasetError, match=pattern):
        load_splits(TINY, root)


def test_num_classes_mismatch(tmp_path):
    root = bad_split(tmp_path, good_split())
    with pytest.raises(DatasetError, match=r"class 3 has no images in the train split "
                                           r"\(Tiny expects 4 classes .* train split has 3\)"):
        load_splits(dataclasses.replace(TINY, num_classes=4), root)
    # without num_classes the class count comes from train, and labels must be 0..n-1
    s = load_splits(dataclasses.replace(TINY, num_classes=None), root)
    assert s.num_classes == 3
    gap = good_split()
    gap["train"][2][1] = 5
    gap["test"] = []
    with pytest.raises(DatasetError, match=r"train\[2\] = .*label 5 is out of range 0\.\.2 "
                                           r"\(the train split has 3 classes"):
        load_splits(dataclasses.replace(TINY, num_classes=None), bad_split(tmp_path, gap))


# ------------------------------------------------------------------------------------------------
# FGVC-Aircraft


def write_fgvc(root: Path, variants=("707-320", "A300B4", "Cessna 172")):
    d = root / "fgvc_aircraft"
    (d / "images").mkdir(parents=True)
    (d / "variants.txt").write_text("\n".join(variants) + "\n")
    lists = {"train": [("1000", 2), ("1001", 0), ("1002", 1), ("1003", 0)],
             "val": [("2000", 1), ("2001", 0), ("2002", 2)],
             "test": [("3000", 0), ("3001", 2), ("3002", 1)]}
    for split, rows in lists.items():
        (d / f"images_variant_{split}.txt").write_text(
            "".join(f"{i} {variants[y]}\n" for i, y in rows))
        for i, _ in rows:
            write_image(d / "images" / f"{i}.jpg", fmt="JPEG")
    return lists


def test_fgvc_loads_in_file_order(tmp_path):
    lists = write_fgvc(tmp_path)
    spec = dataclasses.replace(get_spec("FGVCAircraft"), num_classes=3)
    s = load_splits(spec, str(tmp_path))
    assert s.classnames == ("707-320", "A300B4", "Cessna 172")  # variants.txt order
    assert [d.label for d in s.train] == [y for _, y in lists["train"]]
    assert s.train[0].impath == str(tmp_path / "fgvc_aircraft" / "images" / "1000.jpg")
    assert s.train[0].classname == "Cessna 172"  # names with spaces survive
    assert len(s.val) == len(s.test) == 3
    with pytest.raises(DatasetError, match="expects 100 classes"):
        load_splits("FGVCAircraft", str(tmp_path))


def test_fgvc_errors(tmp_path):
    write_fgvc(tmp_path)
    spec = dataclasses.replace(get_spec("FGVCAircraft"), num_classes=3)
    d = tmp_path / "fgvc_aircraft"
    with open(d / "images_variant_val.txt", "a") as f:
        f.write("2003 Boeing 999\n")
    with pytest.raises(DatasetError, match=r"images_variant_val\.txt: line 4 '2003 Boeing 999': "
                                           r"variant 'Boeing 999' is not in .*variants\.txt"):
        load_splits(spec, str(tmp_path))
    (d / "images_variant_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"val list not found: .*images_variant_val\.txt"):
        load_splits(spec, str(tmp_path))


# ------------------------------------------------------------------------------------------------
# ImageNet and variants

WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
         "n01491361": "tiger shark", "n01494475": "hammerhead shark"}


def write_classnames(d: Path, wnids=WNIDS):
    d.mkdir(parents=True, exist_ok=True)
    (d / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in wnids.items()))


def write_imagenet(root: Path, wnids=("n01443537", "n01440764", "n01484850")):
    d = root / "imagenet"
    write_classnames(d, {w: WNIDS[w] for w in sorted(wnids)})
    for split, n in (("train", 3), ("val", 2)):
        for w in wnids:
            for i in (2, 0, 1)[:n]:
                write_image(d / "images" / split / w / f"{w}_{i}.JPEG", fmt="JPEG")
    return d


def test_imagenet_labels_sorted_wnids_and_val_is_test(tmp_path):
    write_imagenet(tmp_path)
    spec = dataclasses.replace(get_spec("ImageNet"), num_classes=3)
    s = load_splits(spec, str(tmp_path))
    assert s.classnames == ("tench", "goldfish", "great white shark")
    assert [d.label for d in s.train] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # file names sorted within a class (documented deviation from CoOp's unsorted listdir)
    assert [Path(d.impath).name for d in s.train[:3]] == [f"n01440764_{i}.JPEG" for i in range(3)]
    assert s.val_is_test and s.val == s.test and len(s.test) == 6
    assert s.relpath(s.test[0]) == "val/n01440764/n01440764_0.JPEG"
    with pytest.raises(DatasetError, match="expects 1000 classes"):
        load_splits("ImageNet", str(tmp_path))


def test_imagenet_errors(tmp_path):
    d = write_imagenet(tmp_path)
    spec = dataclasses.replace(get_spec("ImageNet"), num_classes=3)
    empty = d / "images" / "train" / "n01491361"
    empty.mkdir()
    (d / "images" / "val" / "n01491361").mkdir()
    write_classnames(d)
    with pytest.raises(DatasetError, match=r"class folder .*train/n01491361 \('tiger shark'\) "
                                           r"has no images"):
        load_splits(dataclasses.replace(spec, num_classes=4), str(tmp_path))
    empty.rmdir()
    with pytest.raises(DatasetError, match=r"class folders of .*train and .*val differ: only in "
                                           r"train \[\], only in val \['n01491361'\]"):
        load_splits(spec, str(tmp_path))
    (d / "images" / "val" / "n01491361").rmdir()
    write_classnames(d, {"n01440764": "tench", "n01443537": "goldfish"})
    with pytest.raises(DatasetError, match=r"class folder .*n01484850 is not listed in "
                                           r".*classnames\.txt"):
        load_splits(spec, str(tmp_path))
    (d / "classnames.txt").write_text("n01440764\n")
    with pytest.raises(DatasetError, match=r"classnames\.txt: line 1 'n01440764': expected "
                                           r"'<wnid> <class name>'"):
        load_splits(spec, str(tmp_path))
    (d / "classnames.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"class names file not found: .*classnames\.txt"):
        load_splits(spec, str(tmp_path))


def test_imagenet_a_style_relabels_the_sorted_subset(tmp_path):
    """A/R: 3 of the 5 wnids (200 of 1000 in the real thing) -> labels 0..2, names by wnid."""
    d = tmp_path / "imagenet-adversarial"
    write_classnames(d)
    for w in ("n01494475", "n01443537", "n01484850"):
        for i in range(2):
            write_image(d / "imagenet-a" / w / f"{i}.png", mode="RGBA")
    (d / "imagenet-a" / "README.txt").write_text("not a class\n")
    spec = dataclasses.replace(get_spec("ImageNetA"), num_classes=3)
    s = load_splits(spec, str(tmp_path))
    assert s.classnames == ("goldfish", "great white shark", "hammerhead shark")
    assert [d.label for d in s.test] == [0, 0, 1, 1, 2, 2]
    assert s.train == () and s.val == () and s.dataset == "ImageNetA"
    with pytest.raises(DatasetError, match=r"ImageNetA expects 200 classes .* test split has 3"):
        load_splits("ImageNetA", str(tmp_path))


def test_imagenet_sketch_style_is_full_way(tmp_path):
    d = tmp_path / "imagenet-sketch"
    write_classnames(d)
    for w in WNIDS:
        write_image(d / "images" / w / "a.jpg", fmt="JPEG")
    s = load_splits(dataclasses.replace(get_spec("ImageNetSketch"), num_classes=5), str(tmp_path))
    assert s.classnames == tuple(WNIDS.values())
    assert [d.label for d in s.test] == list(range(5))


def test_imagenet_v2_index_folders(tmp_path):
    d = tmp_path / "imagenetv2"
    write_classnames(d)
    fmt = d / "imagenetv2-matched-frequency-format-val"
    for i in (0, 1, 2, 3, 4, 10):
        if i < 5:
            write_image(fmt / str(i) / "x.jpeg", fmt="JPEG")
    spec = dataclasses.replace(get_spec("ImageNetV2"), num_classes=5)
    s = load_splits(spec, str(tmp_path))
    assert s.classnames == tuple(WNIDS.values())
    assert [(d.label, d.classname) for d in s.test] == list(enumerate(WNIDS.values()))
    write_image(fmt / "10" / "y.jpeg", fmt="JPEG")
    with pytest.raises(DatasetError, match=r"format-val/10: label 10 is out of range, .*"
                                           r"classnames\.txt lists 5 classes"):
        load_splits(spec, str(tmp_path))
    for f in (fmt / "10").iterdir():
        f.unlink()
    (fmt / "10").rmdir()
    for f in (fmt / "3").iterdir():
        f.unlink()
    (fmt / "3").rmdir()
    with pytest.raises(DatasetError, match=r"class 3 \('tiger shark'\) has no images in the "
                                           r"test split"):
        load_splits(spec, str(tmp_path))


# ------------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("mode,fmt", [("RGB", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"),
                                      ("CMYK", "JPEG"), ("I;16", "PNG"), ("RGB", "JPEG")])
def test_every_mode_becomes_rgb(tmp_path, mode, fmt):
    p = tmp_path / f"img.{fmt.lower()}"
    write_image(p, mode=mode, fmt=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning
        img = load_image(str(p))
    assert img.mode == "RGB" and img.size == (10, 7)
    ds = ImageListDataset([Datum(str(p), 2, "x")], eval_transform(16))
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 2


def test_grey_16bit_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "g16.png"
    write_image(p, mode="I;16", value=200)
    assert load_image(str(p)).getpixel((0, 0)) == (200, 200, 200)


def test_corrupt_truncated_and_missing_images_are_named(tmp_path):
    bad = tmp_path / "cls" / "corrupt.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a JPEG")
    good = tmp_path / "cls" / "good.jpg"
    write_image(good, fmt="JPEG", size=(64, 64))
    cut = tmp_path / "cls" / "truncated.jpg"
    cut.write_bytes(good.read_bytes()[:200])
    ds = ImageListDataset([Datum(str(good), 0, "a"), Datum(str(bad), 0, "a"),
                           Datum(str(cut), 0, "a"), Datum(str(tmp_path / "gone.png"), 0, "a")],
                          eval_transform(8))
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(ImageReadError, match=r"corrupt or unsupported image .*cls/corrupt\.jpg"):
        ds[1]
    with pytest.raises(ImageReadError, match=r"corrupt or unsupported image .*truncated\.jpg"):
        ds[2]
    with pytest.raises(ImageReadError, match=r"image not found: .*gone\.png"):
        ds[3]


def test_dataset_over_loaded_splits_with_dataloader(tmp_path):
    write_split_dataset(tmp_path)
    s = load_splits(TINY, str(tmp_path))
    loader = torch.utils.data.DataLoader(ImageListDataset(s.test, eval_transform(12)),
                                         batch_size=4)
    batches = list(loader)
    assert batches[0][0].shape == (4, 3, 12, 12)
    assert torch.cat([b[1] for b in batches]).tolist() == [d.label for d in s.test]


# ------------------------------------------------------------------------------------------------
# templates and transforms


def test_templates():
    names = ["Sea_Lake", "big_dog"]
    assert class_prompts(names, "EuroSAT") == ["a photo of a Sea Lake.", "a photo of a big dog."]
    assert class_prompts(names, "EuroSAT", "coop") == [
        "a centered satellite photo of Sea Lake.", "a centered satellite photo of big dog."]
    assert class_prompts(["banded"], "DescribableTextures", "coop") == ["banded texture."]
    assert class_prompts(["rose"], "Flowers102", "coop") == ["a photo of a rose, a type of flower."]
    assert class_prompts(["x"], "Food101", "coop") == ["a photo of x, a type of food."]
    assert class_prompts(["x"], "ImageNetA", "coop") == ["a photo of a x."]
    # synthetic datasets carry their own template
    assert class_prompts(["red stripes"], "ToyPatterns", "coop") == ["a red stripes pattern."]
    assert class_prompts(["a_b"], "", "itap of a {}.") == ["itap of a a b."]
    with pytest.raises(ValueError, match="template='fancy' is not one of"):
        class_prompts(["x"], "EuroSAT", "fancy")
    with pytest.raises(KeyError, match="unknown dataset 'Nope'"):
        class_prompts(["x"], "Nope", "coop")


def test_transforms_shapes_and_normalisation():
    img = Image.new("RGB", (40, 20), (255, 0, 128))
    x = eval_transform(16)(img)
    assert x.shape == (3, 16, 16)
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN,
                                                                    CLIP_STD)])
    assert torch.allclose(x[:, 8, 8], expected, atol=1e-2)
    torch.manual_seed(0)
    t = train_transform(24, 0.5)
    assert all(t(img).shape == (3, 24, 24) for _ in range(3))
    crop = t.transforms[0]
    assert crop.scale == (0.5, 1.0) and crop.interpolation.value == "bicubic"
    assert eval_transform(16).transforms[0].interpolation.value == "bicubic"
    with pytest.raises(ValueError, match="scale_min=0"):
        train_transform(24, 0)
    with pytest.raises(ValueError, match="image_size=0"):
        eval_transform(0)
