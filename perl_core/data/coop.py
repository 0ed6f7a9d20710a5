"""CoOp-format datasets -> `Splits` of `Datum`s, over fsspec (local folders and `s3://`).

`load_splits(name_or_spec, data_root)` reads a dataset laid out as in CoOp's DATASETS.md (see
`perl_core.data.benchmarks` for the 15 folders) with the loader its `DatasetSpec` names:

- `split_json`: `<dataset_dir>/<split_file>`, `{"train"|"val"|"test": [[relpath, label,
  classname], ...]}`, relpaths under `<dataset_dir>/<image_dir>`; list order is kept (few-shot
  sampling depends on it).
- `fgvc`: `variants.txt` (one class per line: the label order) and
  `images_variant_{train,val,test}.txt` (`<image id> <variant name>` per line, file order kept),
  images `<image_dir>/<image id>.jpg`.
- `imagenet`: `<image_dir>/{train,val}/<wnid>/<file>` plus `classnames.txt` (`<wnid> <name>` per
  line). Label = position of the wnid folder in sorted order, name looked up by wnid. The
  official val set is the test set and also the val split (`Splits.val_is_test`), as in CoOp.
  **Documented deviation:** file names are sorted within each class folder; CoOp uses an unsorted
  `os.listdir`, which makes its ImageNet few-shot sets filesystem-dependent.
- `imagenet_variant` (test only, a copy of `classnames.txt` in the variant's folder):
  `extra["layout"] == "index"` (ImageNet-V2: folders `0..999`, label = int(folder), name = line
  `label` of classnames.txt) or `"wnid"` (Sketch, A, R: label = position of the wnid folder in
  sorted order; A and R have 200 folders, hence a 200-way label space and class list).
  Top-level files (ImageNet-A's README.txt) and hidden entries are ignored.

Every loader only lists and reads text files: no image is opened. The result is validated: a
missing data root / folder / split file, malformed JSON or entries, a label out of range, a label
named inconsistently, a class without training images and a class count that disagrees with
`DatasetSpec.num_classes` each raise an error naming the file and the offending entry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from perl_core.data import storage
from perl_core.data.registry import DatasetSpec, get_spec

SPLIT_NAMES = ("train", "val", "test")
CLASSNAMES_FILE = "classnames.txt"
FGVC_VARIANTS_FILE = "variants.txt"
FGVC_SPLIT_FILE = "images_variant_{}.txt"


class DatasetError(ValueError):
    """A dataset on disk does not match its expected CoOp layout or content."""


@dataclass(frozen=True)
class Datum:
    impath: str  # full local path or URL of the image
    label: int
    classname: str


@dataclass(frozen=True)
class Splits:
    train: tuple[Datum, ...]
    val: tuple[Datum, ...]
    test: tuple[Datum, ...]
    classnames: tuple[str, ...]  # indexed by label
    dataset: str = ""  # canonical dataset name
    image_root: str = ""  # the folder (path or URL) that relative image paths start from
    val_is_test: bool = False  # ImageNet: CoOp uses the test set as val (never few-shot sampled)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def relpath(self, item: Datum) -> str:
        """`item.impath` relative to `image_root` ('/'-separated)."""
        root = self.image_root.rstrip("/").rstrip(os.sep)
        if not root or not item.impath.startswith(root + "/") and \
                not item.impath.startswith(root + os.sep):
            raise ValueError(f"{item.impath} is not under the image root {self.image_root!r}")
        return item.impath[len(root) + 1:].replace(os.sep, "/")


# ------------------------------------------------------------------------------------------------
# entry point


def load_splits(name_or_spec: str | DatasetSpec, data_root: str, **storage_options: Any) -> Splits:
    """The train/val/test lists of a registered dataset under `data_root` (path or URL)."""
    spec = name_or_spec if isinstance(name_or_spec, DatasetSpec) else get_spec(name_or_spec)
    root = _Root.open(data_root, spec, storage_options)
    loader = _LOADERS.get(spec.loader)
    if loader is None:
        raise ValueError(f"DatasetSpec({spec.name!r}).loader = {spec.loader!r} is not one of "
                         f"{sorted(_LOADERS)}")
    return loader(spec, root)


@dataclass(frozen=True)
class _Root:
    """A dataset folder: its URL (what Datum.impath starts with) and its fs + path inside it."""

    fs: Any
    url: str
    path: str
    storage_options: dict

    @classmethod
    def open(cls, data_root: str, spec: DatasetSpec, storage_options: dict) -> "_Root":
        data_root = os.fspath(data_root) if data_root is not None else ""
        if not str(data_root):
            raise ValueError(f"{spec.name}: data_root is empty (the folder holding "
                             f"{spec.dataset_dir!r}/)")
        fs, path = storage.open_fs(data_root, **storage_options)
        if not storage.is_url(data_root):
            path = data_root = os.path.normpath(path)  # absolute local path, without file://
        if not fs.isdir(path):
            raise FileNotFoundError(f"data root not found (or not a folder): {data_root}")
        top = cls(fs, str(data_root).rstrip("/") or "/", path.rstrip("/") or "/",
                  storage_options)
        ds = top.sub(spec.dataset_dir)
        if not fs.isdir(ds.path):
            raise FileNotFoundError(
                f"{spec.name}: dataset folder not found: {ds.url} (expected "
                f"{spec.dataset_dir}/ under the data root, in CoOp's layout; see docs/data.md)")
        return ds

    def sub(self, *parts: str) -> "_Root":
        parts = tuple(p for p in parts if p)
        if not parts:
            return self
        return _Root(self.fs, storage.join(self.url, *parts),
                     "/".join([self.path.rstrip("/"), *parts]), self.storage_options)

    def read_text(self, what: str) -> str:
        if not self.fs.isfile(self.path):
            raise FileNotFoundError(f"{what} not found: {self.url}")
        with self.fs.open(self.path, "rb") as f:
            data = f.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DatasetError(f"{self.url}: not UTF-8 text ({e})") from None

    def class_folders(self) -> dict[str, list[str]]:
        """{folder name: sorted file names} for every non-hidden subfolder (one level of files).

        Top-level files (README.txt) and hidden entries are ignored. Remote stores list with one
        recursive `find`; empty folders do not exist there, locally they are kept (empty list).
        """
        if not self.fs.isdir(self.path):
            raise FileNotFoundError(f"image folder not found: {self.url}")
        groups: dict[str, list[str]] = {}
        if not storage.is_url(self.url):
            with os.scandir(self.path) as top:
                for d in top:
                    if d.name.startswith(".") or not d.is_dir():
                        continue
                    with os.scandir(d.path) as inner:
                        groups[d.name] = [f.name for f in inner
                                          if not f.name.startswith(".") and f.is_file()]
        else:
            base = self.path.rstrip("/") + "/"
            for p in self.fs.find(self.path, detail=False):
                rel = p[len(base):] if p.startswith(base) else p
                parts = rel.split("/")
                if len(parts) != 2 or any(s.startswith(".") or not s for s in parts):
                    continue
                groups.setdefault(parts[0], []).append(parts[1])
        return {k: sorted(v) for k, v in sorted(groups.items())}


# ------------------------------------------------------------------------------------------------
# split_json


def read_split_file(split_url: str, image_root: str, spec: DatasetSpec | None = None,
                    **storage_options: Any) -> Splits:
    """Parse and validate one `split_zhou_*.json` (path or URL); impaths = image_root/relpath.

    `spec` (optional) supplies num_classes / test_only / the dataset name for the checks.
    """
    fs, path = storage.open_fs(split_url, **storage_options)
    if not fs.isfile(path):
        raise FileNotFoundError(f"split file not found: {split_url}")
    with fs.open(path, "rb") as f:
        raw = f.read()
    return _parse_split_json(raw, split_url, image_root, spec)


def _load_split_json(spec: DatasetSpec, root: _Root) -> Splits:
    if not spec.split_file:
        raise ValueError(f"DatasetSpec({spec.name!r}) has loader 'split_json' but no split_file")
    split = root.sub(spec.split_file)
    if not root.fs.isfile(split.path):
        raise FileNotFoundError(f"{spec.name}: split file not found: {split.url}")
    with root.fs.open(split.path, "rb") as f:
        raw = f.read()
    return _parse_split_json(raw, split.url, root.sub(spec.image_dir).url, spec)


def _parse_split_json(raw: bytes, source: str, image_root: str, spec: DatasetSpec | None
                      ) -> Splits:
    import json

    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}, column {e.colno}" if hasattr(e, "lineno") else ""
        raise DatasetError(f"{source}: malformed JSON{where}: {getattr(e, 'msg', e)}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{source}: expected a JSON object with keys {list(SPLIT_NAMES)}, "
                           f"got {type(data).__name__}")
    test_only = bool(spec and spec.test_only)
    required = ("test",) if test_only else SPLIT_NAMES
    missing = [k for k in required if k not in data]
    if missing:
        raise DatasetError(f"{source}: missing key(s) {missing}; a split file has "
                           f"{list(SPLIT_NAMES)}, each a list of [relative_path, label, "
                           f"classname]")
    prefix = image_root.rstrip("/") + "/" if storage.is_url(image_root) else \
        image_root.rstrip(os.sep) + os.sep
    out: dict[str, list[Datum]] = {}
    for name in SPLIT_NAMES:
        entries = data.get(name, [])
        if not isinstance(entries, list):
            raise DatasetError(f"{source}: {name!r} must be a list of [relative_path, label, "
                               f"classname], got {type(entries).__name__}")
        items = []
        for i, e in enumerate(entries):
            if not (isinstance(e, (list, tuple)) and len(e) == 3 and isinstance(e[0], str)
                    and e[0] and isinstance(e[1], int) and not isinstance(e[1], bool)
                    and isinstance(e[2], str)):
                raise DatasetError(f"{source}: {name}[{i}] = {e!r}: expected "
                                   f"[relative_path (str), label (int), classname (str)]")
            items.append(Datum(prefix + e[0].lstrip("/"), e[1], e[2]))
        out[name] = items

    def where(split: str, i: int) -> str:
        return f"{split}[{i}] = {data[split][i]!r}"

    return _validated(spec, source, out, where, image_root=image_root)


# ------------------------------------------------------------------------------------------------
# FGVC-Aircraft


def _load_fgvc(spec: DatasetSpec, root: _Root) -> Splits:
    vfile = root.sub(spec.extra.get("variants_file", FGVC_VARIANTS_FILE))
    classnames: list[str] = []
    for n, line in enumerate(vfile.read_text(f"{spec.name}: class list").splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if name in classnames:
            raise DatasetError(f"{vfile.url}: line {n}: variant {name!r} is listed twice")
        classnames.append(name)
    if not classnames:
        raise DatasetError(f"{vfile.url}: no variants listed")
    label_of = {c: i for i, c in enumerate(classnames)}
    image_root = root.sub(spec.image_dir)
    pattern = spec.extra.get("split_file_pattern", FGVC_SPLIT_FILE)
    out: dict[str, list[Datum]] = {}
    lines_of: dict[str, list[tuple[str, int]]] = {}
    for split in SPLIT_NAMES:
        f = root.sub(pattern.format(split))
        items, locs = [], []
        for n, line in enumerate(f.read_text(f"{spec.name}: {split} list").splitlines(), 1):
            parts = line.strip().split(" ")
            if not parts[0]:
                continue
            cname = " ".join(parts[1:])
            if len(parts) < 2 or cname not in label_of:
                raise DatasetError(f"{f.url}: line {n} {line.strip()!r}: variant {cname!r} is "
                                   f"not in {vfile.url}")
            items.append(Datum(storage.join(image_root.url, parts[0] + ".jpg"),
                               label_of[cname], cname))
            locs.append((f.url, n))
        out[split], lines_of[split] = items, locs

    def where(split: str, i: int) -> str:
        url, n = lines_of[split][i]
        return f"{url}: line {n}"

    return _validated(spec, root.url, out, where, image_root=image_root.url,
                      label_space=classnames)


# ------------------------------------------------------------------------------------------------
# ImageNet and its variants


def _read_classnames(f: _Root, spec: DatasetSpec) -> dict[str, str]:
    """classnames.txt -> {wnid: name}, in file order."""
    names: dict[str, str] = {}
    for n, line in enumerate(f.read_text(f"{spec.name}: class names file").splitlines(), 1):
        parts = line.strip().split(" ")
        if not parts[0]:
            continue
        name = " ".join(parts[1:]).strip()
        if not name:
            raise DatasetError(f"{f.url}: line {n} {line.strip()!r}: expected '<wnid> <class "
                               f"name>'")
        if parts[0] in names:
            raise DatasetError(f"{f.url}: line {n}: {parts[0]!r} is listed twice")
        names[parts[0]] = name
    if not names:
        raise DatasetError(f"{f.url}: no classes listed")
    return names


def _wnid_items(spec: DatasetSpec, folder: _Root, folders: dict[str, list[str]],
                names: dict[str, str], names_url: str) -> list[Datum]:
    """Label = position of the folder in sorted order; name looked up by wnid."""
    items = []
    for label, (wnid, files) in enumerate(folders.items()):
        if wnid not in names:
            raise DatasetError(f"{spec.name}: class folder {storage.join(folder.url, wnid)} is "
                               f"not listed in {names_url}")
        if not files:
            raise DatasetError(f"{spec.name}: class folder {storage.join(folder.url, wnid)} "
                               f"({names[wnid]!r}) has no images")
        prefix = storage.join(folder.url, wnid)
        items.extend(Datum(storage.join(prefix, f), label, names[wnid]) for f in files)
    return items


def _load_imagenet(spec: DatasetSpec, root: _Root) -> Splits:
    names_file = root.sub(spec.extra.get("classnames_file", CLASSNAMES_FILE))
    names = _read_classnames(names_file, spec)
    image_root = root.sub(spec.image_dir)
    train_dir, val_dir = image_root.sub("train"), image_root.sub("val")
    train_folders = train_dir.class_folders()
    val_folders = val_dir.class_folders()
    if set(train_folders) != set(val_folders):
        only_t = sorted(set(train_folders) - set(val_folders))
        only_v = sorted(set(val_folders) - set(train_folders))
        raise DatasetError(f"{spec.name}: the class folders of {train_dir.url} and {val_dir.url} "
                           f"differ: only in train {only_t[:5]}{'...' if len(only_t) > 5 else ''}"
                           f", only in val {only_v[:5]}{'...' if len(only_v) > 5 else ''}")
    train = _wnid_items(spec, train_dir, train_folders, names, names_file.url)
    test = _wnid_items(spec, val_dir, val_folders, names, names_file.url)
    splits = _validated(spec, image_root.url, {"train": train, "val": [], "test": test},
                        lambda s, i: {"train": train, "test": test}[s][i].impath,
                        image_root=image_root.url)
    return _replace(splits, val=splits.test, val_is_test=True)


def _load_imagenet_variant(spec: DatasetSpec, root: _Root) -> Splits:
    names_file = root.sub(spec.extra.get("classnames_file", CLASSNAMES_FILE))
    names = _read_classnames(names_file, spec)
    image_root = root.sub(spec.image_dir)
    folders = image_root.class_folders()
    layout = spec.extra.get("layout", "wnid")
    if layout == "index":
        name_list = list(names.values())
        test = []
        numbered = sorted(((int(k), k) for k in folders if k.isdigit()))
        for label, key in numbered:
            if label >= len(name_list):
                raise DatasetError(f"{spec.name}: class folder {storage.join(image_root.url, key)}"
                                   f": label {label} is out of range, {names_file.url} lists "
                                   f"{len(name_list)} classes")
            prefix = storage.join(image_root.url, key)
            test.extend(Datum(storage.join(prefix, f), label, name_list[label])
                        for f in folders[key])
        label_space = name_list
    elif layout == "wnid":
        test = _wnid_items(spec, image_root, folders, names, names_file.url)
        label_space = None
    else:
        raise ValueError(f"DatasetSpec({spec.name!r}).extra['layout'] = {layout!r} is not one of "
                         f"['index', 'wnid']")
    return _validated(spec, image_root.url, {"train": [], "val": [], "test": test},
                      lambda s, i: test[i].impath, image_root=image_root.url,
                      label_space=label_space)


# ------------------------------------------------------------------------------------------------
# validation


def _validated(spec: DatasetSpec | None, source: str, parts: dict[str, list[Datum]],
               where: Callable[[str, int], str], *, image_root: str,
               label_space: Sequence[str] | None = None) -> Splits:
    """Check labels and names across splits; return Splits with classnames indexed by label.

    The class list comes from the reference split (train; test for test-only datasets), as
    Dassl's `get_lab2cname(train)`. `label_space` (optional): the names the loader knows for
    labels 0..n-1 (used to name a class that has no images).
    """
    name = spec.name if spec else ""
    test_only = bool(spec and spec.test_only)
    ref = "test" if test_only else "train"
    if not parts[ref]:
        raise DatasetError(f"{source}: the {ref} split is empty")
    if test_only and (parts["train"] or parts["val"]):
        parts = {**parts, "train": [], "val": []}  # a test-only dataset is never trained on
    seen: dict[int, tuple[str, str, int]] = {}  # label -> (classname, split, index)
    for split in (ref, *(s for s in SPLIT_NAMES if s != ref)):
        for i, d in enumerate(parts[split]):
            first = seen.get(d.label)
            if first is None:
                seen[d.label] = (d.classname, split, i)
            elif first[0] != d.classname:
                raise DatasetError(f"{source}: {where(split, i)}: label {d.label} is named "
                                   f"{d.classname!r}, but {where(first[1], first[2])} names it "
                                   f"{first[0]!r}")
    ref_labels = {d.label for d in parts[ref]}
    n = spec.num_classes if spec and spec.num_classes else len(ref_labels)
    for split in (ref, *(s for s in SPLIT_NAMES if s != ref)):
        for i, d in enumerate(parts[split]):
            if not 0 <= d.label < n:
                expected = (f"{name} has {n} classes (DatasetSpec.num_classes)"
                            if spec and spec.num_classes else
                            f"the {ref} split has {n} classes, labelled 0..{n - 1}")
                raise DatasetError(f"{source}: {where(split, i)}: label {d.label} is out of range"
                                   f" 0..{n - 1} ({expected})")
    missing = sorted(set(range(n)) - ref_labels)
    if missing:
        def label_name(y: int) -> str:
            if y in seen:
                return f"{y} ({seen[y][0]!r})"
            if label_space is not None and y < len(label_space):
                return f"{y} ({label_space[y]!r})"
            return str(y)

        shown = ", ".join(label_name(y) for y in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        counted = (f"{name} expects {n} classes (DatasetSpec.num_classes), the {ref} split has "
                   f"{len(ref_labels)}" if spec and spec.num_classes else "")
        raise DatasetError(f"{source}: class {shown} has no images in the {ref} split"
                           + (f" ({counted})" if counted else ""))
    classnames = tuple(seen[y][0] for y in range(n))
    return Splits(train=tuple(parts["train"]), val=tuple(parts["val"]), test=tuple(parts["test"]),
                  classnames=classnames, dataset=name, image_root=image_root)


def _replace(splits: Splits, **changes: Any) -> Splits:
    import dataclasses

    return dataclasses.replace(splits, **changes)


_LOADERS: dict[str, Callable[[DatasetSpec, _Root], Splits]] = {
    "split_json": _load_split_json,
    "fgvc": _load_fgvc,
    "imagenet": _load_imagenet,
    "imagenet_variant": _load_imagenet_variant,
}


# ------------------------------------------------------------------------------------------------
# content digest (what a tracked run read)


@dataclass(frozen=True)
class DataDigest:
    """The identity of a dataset's content under one data root.

    digest: 16 hex of a sha256. A single split file (`split_json`): of its bytes, so
    `sha256sum split_zhou_X.json | cut -c1-16` gives the same; several (`fgvc`): of each file's
    name and sha256; a listing (`imagenet`, `imagenet_variant`): of the class-name file and the
    sorted relative image paths (`train/<wnid>/<file>`; images are not read).
    source: the split file, or the folder the digest covers. stamp: size and modification time
    of the files read, to tell cheaply that they did not change (for a listing: of its class-name
    file only; listing again is what costs, so a `known` listing digest is kept while that file
    stays)."""

    dataset: str  # canonical name
    digest: str
    source: str  # URL or local path
    kind: str  # "split file", "split files" or "file listing"
    stamp: tuple[str, ...] = ()


def dataset_digest(name_or_spec: str | DatasetSpec, data_root: str, *,
                   known: DataDigest | None = None, **storage_options: Any) -> DataDigest:
    """The content digest of a registered dataset under `data_root`. With `known` (an earlier
    result for the same dataset and root) whose files still have the same size and modification
    time, `known` is returned without reading them again (one stat per file). Raises
    FileNotFoundError naming the missing root, folder or file."""
    spec = name_or_spec if isinstance(name_or_spec, DatasetSpec) else get_spec(name_or_spec)
    root = _Root.open(data_root, spec, storage_options)
    files, listed = _digest_inputs(spec, root)
    for f in files:
        if not f.fs.isfile(f.path):
            raise FileNotFoundError(f"{spec.name}: split file not found: {f.url}")
    stamp = tuple(_file_stamp(f) for f in files)
    if known is not None and known.dataset == spec.name and known.stamp == stamp:
        return known
    import hashlib

    sums = []
    for f in files:
        with f.fs.open(f.path, "rb") as fh:
            sums.append((f.url[len(root.url):].lstrip("/"), hashlib.sha256(fh.read())))
    if len(files) == 1 and not listed:
        return DataDigest(spec.name, sums[0][1].hexdigest()[:16], files[0].url, "split file", stamp)
    h = hashlib.sha256()
    for rel, s in sums:
        h.update(f"{rel}\0{s.hexdigest()}\n".encode())
    for prefix, folder in listed:  # sorted: class_folders sorts folders and files
        for cls, names in folder.class_folders().items():
            h.update("".join(f"{prefix}{cls}/{n}\n" for n in names).encode())
    if listed:
        source = root.sub(spec.image_dir).url
        return DataDigest(spec.name, h.hexdigest()[:16], source, "file listing", stamp)
    return DataDigest(spec.name, h.hexdigest()[:16], root.url, "split files", stamp)


def _digest_inputs(spec: DatasetSpec, root: _Root) -> tuple[list[_Root], list[tuple[str, _Root]]]:
    """(files hashed by content, (prefix, folder) pairs hashed by listing) of a dataset."""
    images = root.sub(spec.image_dir)
    names = root.sub(spec.extra.get("classnames_file", CLASSNAMES_FILE))
    if spec.loader == "split_json":
        if not spec.split_file:
            raise ValueError(f"DatasetSpec({spec.name!r}) has loader 'split_json' but no "
                             f"split_file")
        return [root.sub(spec.split_file)], []
    if spec.loader == "fgvc":
        pattern = spec.extra.get("split_file_pattern", FGVC_SPLIT_FILE)
        return [root.sub(spec.extra.get("variants_file", FGVC_VARIANTS_FILE)),
                *(root.sub(pattern.format(s)) for s in SPLIT_NAMES)], []
    if spec.loader == "imagenet":
        return [names], [("train/", images.sub("train")), ("val/", images.sub("val"))]
    if spec.loader == "imagenet_variant":
        return [names], [("", images)]
    raise ValueError(f"DatasetSpec({spec.name!r}).loader = {spec.loader!r} is not one of "
                     f"{sorted(_LOADERS)}")


def _file_stamp(f: _Root) -> str:
    info = f.fs.info(f.path)
    when = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
    return f"{f.url}|{info.get('size')}|{when}"


__all__ = ["Datum", "Splits", "DatasetError", "load_splits", "read_split_file", "SPLIT_NAMES",
           "DataDigest", "dataset_digest"]
