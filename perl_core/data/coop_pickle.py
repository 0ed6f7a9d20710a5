"""CoOp's own few-shot picks: `split_fewshot/shot_{K}-seed_{S}.pkl` (and ImageNet's
`preprocessed.pkl`), read without `pickle.load`.

CoOp, MaPLe, PromptSRC and MMRL cache their few-shot sets with `pickle.dump(...,
protocol=pickle.HIGHEST_PROTOCOL)` (CoOp `datasets/oxford_pets.py` and siblings):
`{"train": [Datum, ...], "val": [Datum, ...]}` (ImageNet: `{"train": [...]}` only, its val is
the test set), where `Datum` is Dassl's `dassl.data.datasets.base_dataset.Datum`, a plain class
whose `__dict__` holds `_impath` (absolute path on the machine that wrote it), `_label`,
`_domain` and `_classname`. ImageNet's `imagenet/preprocessed.pkl` holds the full `{"train":
[...], "test": [...]}` lists in the order of CoOp's unsorted `os.listdir`.

Reading. `load_datum_pickle` runs a `pickle.Unpickler` whose `find_class` resolves exactly one
global, Dassl's Datum, to an inert stand-in that only collects its state (protocol >= 2 rebuilds
it with NEWOBJ + BUILD and needs no other global; protocol 0/1 also names
`copyreg._reconstructor` and `builtins.object`, which are allowed for that and nothing else).
Any other global is refused before it is ever called, with a `DatasetError` naming the file and
`module.global`; nothing in the file is executed. Labels must be ints and paths/names strings.

Re-rooting and checking (`rebase_items`). A path from another machine (`/home/a/data/
oxford_pets/images/x.jpg`, `C:\\data\\oxford_pets\\images\\x.jpg`) is cut after the dataset
folder (`DatasetSpec.dataset_dir`) and its image folder, and looked up among the items of our
split (train for "train", val for "val"): the result is that split item (so its path lives under
our data root), and its label and class name must agree with the pickle's. Anything else is a
`DatasetError` naming the file and the item.

`coop_fewshot_splits` is what `fewshot_source: coop_pickle` runs (`perl_core.train.
resolve_task`); base/novel subsampling is applied afterwards, as CoOp's `subsample_classes` is.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from collections import Counter
from typing import Any, Sequence

from perl_core.data import storage
from perl_core.data.coop import DatasetError, Datum, Splits
from perl_core.data.registry import get_spec

DASSL_DATUM = ("dassl.data.datasets.base_dataset", "Datum")
FEWSHOT_DIR = "split_fewshot"
IMAGENET_PREPROCESSED = "preprocessed.pkl"
# globals a protocol 0/1 pickle uses to rebuild a plain object: copyreg._reconstructor(cls,
# object, None); Python 2 spells them copy_reg / __builtin__ (our find_class sees raw names)
_RECONSTRUCTOR = {("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")}
_OBJECT = {("builtins", "object"), ("__builtin__", "object")}


def fewshot_pickle_name(shots: int, seed: int) -> str:
    """CoOp's file name of the (shots, seed) few-shot set, under `<dataset_dir>/split_fewshot/`."""
    return f"shot_{shots}-seed_{seed}.pkl"


class _DasslDatum:
    """Inert stand-in for Dassl's Datum while unpickling: it only keeps the state BUILD gives."""

    __slots__ = ("state",)

    def __init__(self) -> None:  # INST/OBJ (protocol 0/1 old-style) call the class with no args
        self.state = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Reconstructor:
    """Stands in for copyreg._reconstructor: rebuilds the Datum stand-in and nothing else. An
    instance without attributes, so a crafted BUILD cannot alter a real (process-wide) function."""

    __slots__ = ()

    def __call__(self, cls: Any, base: Any, state: Any) -> _DasslDatum:
        if cls is not _DasslDatum or base is not object or state is not None:
            raise TypeError(f"_reconstructor({cls!r}, {base!r}, {state!r}) is not how Dassl's "
                            f"Datum is pickled")
        return _DasslDatum()


_reconstruct = _Reconstructor()


class _DatumUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, source: str):
        super().__init__(file, encoding="utf-8")  # Python 2 str paths decode as text
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == DASSL_DATUM:
            return _DasslDatum
        if (module, name) in _RECONSTRUCTOR:
            return _reconstruct
        if (module, name) in _OBJECT:
            return object
        raise DatasetError(
            f"{self.source}: refused to load the global {module}.{name}: a CoOp few-shot pickle "
            f"holds only dicts, lists and Dassl's {'.'.join(DASSL_DATUM)}, and nothing else is "
            f"rebuilt (the file was not written by CoOp/Dassl, or was altered)")

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(f"{self.source}: refused a persistent id {pid!r} (not in a CoOp "
                           f"few-shot pickle)")


def load_datum_pickle(url: str, **storage_options: Any) -> dict[str, list[Datum]]:
    """{"train": [Datum, ...], ...} of a CoOp/Dassl pickle (path or URL), impaths as written.

    Only Dassl's Datum is rebuilt (see module doc); every value must be a list of Datums.
    """
    try:
        with storage.open_binary(url, **storage_options) as f:
            data = _DatumUnpickler(f, url).load()
    except FileNotFoundError:
        raise FileNotFoundError(f"few-shot pickle not found: {url}") from None
    except DatasetError:
        raise
    except Exception as e:  # truncated / not a pickle / a stand-in rebuilt with odd arguments
        raise DatasetError(f"{url}: not a readable CoOp few-shot pickle ({type(e).__name__}: "
                           f"{e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise DatasetError(f"{url}: expected a dict like {{'train': [Datum, ...], 'val': [...]}},"
                           f" got {type(data).__name__}")
    out: dict[str, list[Datum]] = {}
    for key, items in data.items():
        if not isinstance(items, list):
            raise DatasetError(f"{url}: {key!r} must be a list of Dassl Datum objects, got "
                               f"{type(items).__name__}")
        out[key] = [_datum(url, key, i, it) for i, it in enumerate(items)]
    return out


def _datum(source: str, key: str, i: int, item: Any) -> Datum:
    state = item.state if isinstance(item, _DasslDatum) else None
    if not isinstance(state, dict):
        raise DatasetError(f"{source}: {key}[{i}] is not a Dassl Datum with an attribute dict "
                           f"(got {type(item).__name__})")
    impath, label, cname = (state.get(k) for k in ("_impath", "_label", "_classname"))
    if not (isinstance(impath, str) and impath and isinstance(label, int)
            and not isinstance(label, bool) and isinstance(cname, str)):
        raise DatasetError(f"{source}: {key}[{i}]: expected a Datum with _impath (str), _label "
                           f"(int) and _classname (str), got _impath={impath!r}, "
                           f"_label={label!r}, _classname={cname!r}")
    return Datum(impath, label, cname)


# ------------------------------------------------------------------------------------------------
# re-rooting and checking against the split


def _parts(path: str) -> list[str]:
    """Path components, '/' and '\\' both separators (Windows paths from another machine)."""
    return [p for p in re.split(r"[\\/]+", path) if p not in ("", ".")]


def relpath_candidates(impath: str, dataset_dir: str, image_dir: str) -> list[str]:
    """The '/'-joined paths under the image folder that `impath` can denote, one per place the
    dataset folder appears in it, the last place first (`.../oxford_pets/images/x.jpg` ->
    ["x.jpg"]); empty when the dataset folder (followed by the image folder) is not in it."""
    parts, image = _parts(impath), _parts(image_dir)
    out = []
    for i in range(len(parts) - 1, -1, -1):
        rest = parts[i + 1:]
        if parts[i] == dataset_dir and rest[:len(image)] == image and len(rest) > len(image):
            out.append("/".join(rest[len(image):]))
    return out


def rebase_items(items: Sequence[Datum], split: Sequence[Datum], splits: Splits, *, source: str,
                 key: str) -> tuple[Datum, ...]:
    """`items` (from a CoOp pickle) as the items of `split` (ours, the `key` split of `splits`)
    they name: re-rooted by the dataset folder, label and class name checked (module doc)."""
    spec = get_spec(splits.dataset)
    index: dict[str, Datum] = {}
    for d in split:
        index.setdefault(splits.relpath(d), d)
    out = []
    for i, it in enumerate(items):
        cands = relpath_candidates(it.impath, spec.dataset_dir, spec.image_dir)
        if not cands:
            where = f"{spec.dataset_dir}/{spec.image_dir}/" if spec.image_dir else \
                f"{spec.dataset_dir}/"
            raise DatasetError(f"{source}: {key}[{i}] = {it.impath!r}: no '{where}' in the path, "
                               f"so it cannot be re-rooted under {splits.image_root}")
        found = next((index[c] for c in cands if c in index), None)
        if found is None:
            raise DatasetError(f"{source}: {key}[{i}] = {it.impath!r} is not an item of the "
                               f"{splits.dataset} {key} split (looked for {cands[0]!r} under "
                               f"{splits.image_root}): the pickle was made from other splits")
        if (found.label, found.classname) != (it.label, it.classname):
            raise DatasetError(f"{source}: {key}[{i}] = {it.impath!r} has label {it.label} "
                               f"({it.classname!r}), but the {splits.dataset} {key} split has "
                               f"{found.impath} as label {found.label} ({found.classname!r})")
        out.append(found)
    return tuple(out)


def _check_counts(items: Sequence[Datum], k: int, source: str, key: str,
                  classnames: Sequence[str]) -> None:
    """Dassl takes at most k items per class (k exactly, or the whole class, or k with repeats)."""
    over = [(y, n) for y, n in sorted(Counter(d.label for d in items).items()) if n > k]
    if over:
        shown = ", ".join(f"label {y} ({classnames[y]!r}): {n}" for y, n in over[:5])
        raise DatasetError(f"{source}: {key} has more than {k} items for {len(over)} class(es) "
                           f"({shown}); a shot_{{K}} file has at most K per class: is it the "
                           f"file of another shot count?")


# ------------------------------------------------------------------------------------------------
# the few-shot sets


def coop_fewshot_url(data_root: str, dataset: str, shots: int, seed: int) -> str:
    """`<data_root>/<dataset_dir>/split_fewshot/shot_{shots}-seed_{seed}.pkl`."""
    return storage.join(data_root, get_spec(dataset).dataset_dir, FEWSHOT_DIR,
                        fewshot_pickle_name(shots, seed))


def coop_order(splits: Splits, url: str, **storage_options: Any) -> Splits:
    """`splits` with train in the order of CoOp's `preprocessed.pkl` (ImageNet: CoOp's unsorted
    listing); its train list must hold exactly the items of ours (re-rooted and checked)."""
    data = load_datum_pickle(url, **storage_options)
    if "train" not in data:
        raise DatasetError(f"{url}: no 'train' list (CoOp writes {{'train': [...], 'test': "
                           f"[...]}})")
    train = rebase_items(data["train"], splits.train, splits, source=url, key="train")
    if len(train) != len(splits.train) or len(set(train)) != len(train):
        raise DatasetError(f"{url}: its train list has {len(train)} items ({len(set(train))} "
                           f"distinct), ours {len(splits.train)} under {splits.image_root}: "
                           f"made from another copy of the dataset")
    return dataclasses.replace(splits, train=train)


def find_coop_fewshot(data_root: str, dataset: str, shots: int, seed: int,
                      **storage_options: Any) -> tuple[str, str]:
    """Where CoOp's (shots, seed) picks of `dataset` are: ("fewshot", the shot file) or, for
    ImageNet without one, ("listing", its `preprocessed.pkl`). FileNotFoundError naming the path
    and how to get it when neither is there."""
    url = coop_fewshot_url(data_root, dataset, shots, seed)
    if storage.exists(url, **storage_options):
        return "fewshot", url
    spec = get_spec(dataset)
    folder = storage.join(data_root, spec.dataset_dir)
    pre = storage.join(folder, IMAGENET_PREPROCESSED)
    if spec.loader == "imagenet" and storage.exists(pre, **storage_options):
        return "listing", pre
    raise FileNotFoundError(
        f"fewshot_source=coop_pickle: {url} not found. CoOp (and MaPLe, PromptSRC, MMRL) write "
        f"it on their first run with DATASET.NUM_SHOTS {shots} and SEED {seed}: copy that "
        f"{FEWSHOT_DIR}/ folder into {folder}, or set fewshot_source: sample (the same Dassl "
        f"procedure, run by our sampler)")


def coop_fewshot_splits(splits: Splits, data_root: str, shots: int, seed: int,
                        **storage_options: Any) -> Splits:
    """The few-shot train/val sets CoOp picked for (shots, seed), read from its pickle.

    ImageNet without the shot file but with `imagenet/preprocessed.pkl`: our Dassl sampler run on
    CoOp's listing order, which gives CoOp's picks. shots < 1 keeps every image (CoOp writes no
    file then). Test and class names are unchanged; labels are the full-dataset ones.
    """
    from perl_core.data.fewshot import fewshot_splits

    if shots < 1:
        return fewshot_splits(splits, shots, seed)
    kind, url = find_coop_fewshot(data_root, splits.dataset, shots, seed, **storage_options)
    if kind == "listing":
        return fewshot_splits(coop_order(splits, url, **storage_options), shots, seed)
    data = load_datum_pickle(url, **storage_options)
    if "train" not in data or (not splits.val_is_test and "val" not in data):
        need = "'train'" if splits.val_is_test else "'train' and 'val'"
        raise DatasetError(f"{url}: expected the keys {need}, found {sorted(data)}")
    train = rebase_items(data["train"], splits.train, splits, source=url, key="train")
    _check_counts(train, shots, url, "train", splits.classnames)
    if splits.val_is_test:  # ImageNet: CoOp writes no val, it uses the test set
        val = splits.test
    else:
        val = rebase_items(data["val"], splits.val, splits, source=url, key="val")
        _check_counts(val, min(shots, 4), url, "val", splits.classnames)
    return dataclasses.replace(splits, train=train, val=val)


__all__ = ["load_datum_pickle", "rebase_items", "relpath_candidates", "coop_fewshot_splits",
           "coop_fewshot_url", "coop_order", "find_coop_fewshot", "fewshot_pickle_name",
           "DASSL_DATUM", "FEWSHOT_DIR", "IMAGENET_PREPROCESSED"]
