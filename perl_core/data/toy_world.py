"""The synthetic world's definition: its words, scenes and benchmark recipes, registered.

What each toy benchmark shows and how its classes are laid out (the docstring of
`perl_core.data.synthetic` describes the world); rendering and writing it on disk live there.
This module is light (no numpy, no PIL) and is imported by the package `perl_core.data`, which
registers the datasets (`synthetic=True`) before any name is looked up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from perl_core.data.registry import DatasetSpec, register

IMAGE_SIZE = 48  # = perl-tiny's vision image_size; images are stored at model resolution
IMAGE_DIR = "images"

# Base RGB of each colour word; every image jitters the shade (`perl_core.data.synthetic`).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 30),
    "orange": (245, 135, 20),
    "purple": (140, 50, 185),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "moon")
PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}  # crosses
PATTERNS = ("stripes", "dots", "checks", "waves")
COUNTS = {"two": 2, "three": 3, "four": 4}
STYLES = ("photo", "sketch", "clutter", "sensor")

DEFAULT_SIZES = {"train": 20, "val": 6, "test": 24}


@dataclass(frozen=True)
class Scene:
    """What one image shows. `kind` picks the renderer; unused fields stay None."""

    kind: str  # "object" (one shape), "texture" (full-frame pattern), "count" (n equal shapes)
    colour: str | None = None
    shape: str | None = None
    pattern: str | None = None
    count: str | None = None  # a COUNTS word
    style: str = "photo"  # "photo", "sketch" (outline on paper), "clutter" (busy background),
    # "sensor" (a photo seen through a striped, gridded sensor; never in pretraining)

    def words(self) -> dict[str, str]:
        """The attribute words an exact caption of this scene uses (kind -> word)."""
        if self.kind == "object":
            return {"colour": self.colour, "shape": self.shape}
        if self.kind == "texture":
            return {"colour": self.colour, "pattern": self.pattern}
        if self.kind == "count":
            w = {"count": self.count, "shapes": PLURAL[self.shape]}
            if self.colour is not None:
                w["colour"] = self.colour
            return w
        raise ValueError(f"unknown scene kind {self.kind!r}")


@dataclass(frozen=True)
class ToyDataset:
    """Generation recipe of one benchmark (the registry holds the matching DatasetSpec)."""

    name: str
    dataset_dir: str
    template: str
    kind: str
    rows: tuple[str, ...]  # first word of the grid (colour / pattern / count)
    cols: tuple[str, ...]  # second word (shape / colour / shape)
    style: str = "photo"
    test_only: bool = False
    source: str | None = None
    sizes: dict = field(default_factory=lambda: dict(DEFAULT_SIZES), hash=False, compare=False)

    @property
    def split_file(self) -> str:
        return f"split_zhou_{self.name}.json"

    def cells(self) -> list[tuple[int, int]]:
        """(row, col) per label. A checkerboard: parity-0 cells first (the base half, exactly
        ceil(n/2) of them), then parity-1 cells, so each word lands in both halves."""
        grid = [(i, j) for i in range(len(self.rows)) for j in range(len(self.cols))]
        return [c for c in grid if sum(c) % 2 == 0] + [c for c in grid if sum(c) % 2 == 1]

    def scene(self, label: int) -> Scene:
        i, j = self.cells()[label]
        r, c = self.rows[i], self.cols[j]
        if self.kind == "object":
            return Scene("object", colour=r, shape=c, style=self.style)
        if self.kind == "texture":
            return Scene("texture", pattern=r, colour=c, style=self.style)
        if self.kind == "count":
            return Scene("count", count=r, shape=c, style=self.style)
        raise ValueError(f"unknown kind {self.kind!r}")

    def classnames(self) -> list[str]:
        return [classname(self.scene(y)) for y in range(len(self.cells()))]

    def num_base(self) -> int:
        return math.ceil(len(self.cells()) / 2)


def classname(scene: Scene) -> str:
    """The class name of a benchmark scene: the words CLIP was pretrained on, in caption order."""
    if scene.kind == "object":
        return f"{scene.colour} {scene.shape}"
    if scene.kind == "texture":
        return f"{scene.colour} {scene.pattern}"
    if scene.kind == "count":
        return f"{scene.count} {PLURAL[scene.shape]}"
    raise ValueError(f"unknown scene kind {scene.kind!r}")


_SHAPES5 = SHAPES[:5]
_COL4 = ("red", "green", "blue", "yellow")
# ToyWorld lists ToyShapes' colours and shapes first with the same checkerboard, so ToyShapes'
# novel classes are also novel in ToyWorld.
_WORLD = ToyDataset("ToyWorld", "toy_world", "a photo of a {}.", "object",
                    tuple(COLOURS), SHAPES)
DATASETS: tuple[ToyDataset, ...] = (
    ToyDataset("ToyShapes", "toy_shapes", "a photo of a {}.", "object", _COL4, _SHAPES5),
    ToyDataset("ToyPatterns", "toy_patterns", "a {} pattern.", "texture", PATTERNS,
               ("red", "green", "blue", "yellow", "purple")),
    ToyDataset("ToyCounts", "toy_counts", "a photo of {}.", "count", tuple(COUNTS), _SHAPES5),
    _WORLD,
    replace(_WORLD, name="ToyWorldV2", dataset_dir="toy_world_v2", test_only=True,
            source="ToyWorld"),
    replace(_WORLD, name="ToyWorldSketch", dataset_dir="toy_world_sketch", style="sketch",
            test_only=True, source="ToyWorld"),
    replace(_WORLD, name="ToyWorldClutter", dataset_dir="toy_world_clutter", style="clutter",
            test_only=True, source="ToyWorld"),
)
# issue 15: base-to-novel under a domain shift shared by all classes (listed after the others, so
# the recipes, images and split files of the existing datasets are unchanged)
DATASETS += (
    ToyDataset("ToyShapesSensor", "toy_shapes_sensor", "a photo of a {}.", "object", _COL4,
               _SHAPES5, style="sensor"),
)
# the benchmarks whose novel classes are held out of pretraining (ToyShapesSensor shares
# ToyShapes' classes and checkerboard, so its novel classes are held out too)
BASE2NOVEL = ("ToyShapes", "ToyPatterns", "ToyCounts")
SHIFTED = ("ToyShapesSensor",)  # base2novel benchmarks with a domain shift unseen in pretraining
BY_NAME = {d.name: d for d in DATASETS}


def toy_dataset(name: str) -> ToyDataset:
    """The generation recipe of a synthetic dataset (case, "-" and "_" ignored, as in the
    registry)."""
    key = name.lower().replace("-", "").replace("_", "")
    for d in DATASETS:
        if d.name.lower() == key:
            return d
    raise KeyError(f"{name!r} is not a synthetic dataset; synthetic: {list(BY_NAME)}")


def held_out_scenes() -> dict[str, list[Scene]]:
    """Compositions the tiny CLIP never sees in pretraining: the novel classes of every toy
    base2novel benchmark (ToyShapes, ToyPatterns, ToyCounts). ToyShapes' novel classes are also
    ToyWorld classes; ToyWorld's other classes were seen."""
    out = {}
    for name in BASE2NOVEL:
        d = BY_NAME[name]
        out[name] = [d.scene(y) for y in range(d.num_base(), len(d.cells()))]
    return out


def is_held_out(scene: Scene) -> bool:
    """True if `scene` shows a held-out composition (also inside a count scene: a held-out
    colour-shape pair is never drawn at all)."""
    held = held_out_scenes()
    pairs_cs = {(s.colour, s.shape) for s in held["ToyShapes"]}
    pairs_pc = {(s.pattern, s.colour) for s in held["ToyPatterns"]}
    pairs_ns = {(s.count, s.shape) for s in held["ToyCounts"]}
    if scene.kind == "object":
        return (scene.colour, scene.shape) in pairs_cs
    if scene.kind == "texture":
        return (scene.pattern, scene.colour) in pairs_pc
    if scene.kind == "count":
        return (scene.count, scene.shape) in pairs_ns or (scene.colour, scene.shape) in pairs_cs
    raise ValueError(f"unknown scene kind {scene.kind!r}")


def _register() -> None:
    for d in DATASETS:
        register(DatasetSpec(
            name=d.name, dataset_dir=d.dataset_dir, image_dir=IMAGE_DIR, template=d.template,
            loader="split_json", split_file=d.split_file, num_classes=len(d.cells()),
            test_only=d.test_only, source=d.source, synthetic=True,
            extra={"kind": d.kind, "style": d.style, "num_base": d.num_base(),
                   "image_size": IMAGE_SIZE}))


_register()

__all__ = ["Scene", "ToyDataset", "DATASETS", "BY_NAME", "BASE2NOVEL", "SHIFTED", "COLOURS",
           "SHAPES", "PLURAL", "PATTERNS", "COUNTS", "STYLES", "DEFAULT_SIZES", "IMAGE_SIZE",
           "IMAGE_DIR", "classname", "toy_dataset", "held_out_scenes", "is_held_out"]
