"""The synthetic world: small CoOp-format benchmarks generated on disk in seconds, for the
embedded default.

No CLIP weights or benchmark datasets can be downloaded in CI or on a laptop, yet the pipeline must
run end to end with numbers that can move. This module draws a small world of coloured shapes,
textures and counted objects (PIL + numpy only), writes it in exactly CoOp's layout
(`<root>/<dataset_dir>/images/<class>/<split>_<n>.png` and `split_zhou_<Name>.json` with unsorted
`[relpath, label, classname]` lists), and registers every dataset (`synthetic=True`) so that
`get_spec("ToyShapes")` and the real CoOp loader work on it unchanged.

Class names are compositions of words (colour x shape, pattern x colour, count x shape). Labels
follow a checkerboard over the word grid, so that CoOp's base/novel split (labels[:ceil(n/2)] are
base) puts every word in both halves: the novel classes are unseen *combinations of seen words*,
which the tiny CLIP (`perl_core.pretrain`) never saw as whole compositions, so zero-shot transfer to
them is possible but not free.

Benchmarks (per class: 20 train / 6 val / 24 test images, 48 x 48 RGB PNG):

- ToyShapes (base2novel, 20 classes: 10 base / 10 novel): colour {red, green, blue, yellow} x
  shape {circle, square, triangle, star, heart}.
- ToyPatterns (base2novel, 20: 10/10): pattern {stripes, dots, checks, waves} x colour {red,
  green, blue, yellow, purple}.
- ToyCounts (base2novel, 15: 8/7): count {two, three, four} x shape, plural {circles, squares,
  triangles, stars, hearts}.
- ToyWorld (source, ImageNet's role; 42: 21/21): colour {red, green, blue, yellow, orange,
  purple} x shape {the five above, cross, moon}.
- ToyWorldV2 (test only, source ToyWorld; 42): same renderer, fresh images (ImageNet-V2's role).
- ToyWorldSketch (test only, source ToyWorld; 42): outlines on paper (ImageNet-Sketch's role).
- ToyWorldClutter (test only, source ToyWorld; 42): smaller objects, heavy clutter and noise
  (ImageNet-A's role).
- ToyShapesSensor (base2novel, 20: 10/10; issue 15): ToyShapes' classes, split and checkerboard,
  seen through a simulated imaging sensor (style "sensor") that perl-tiny's pretraining never
  rendered: achromatic per-column striping (the detector-to-detector gain/offset non-uniformity of
  pushbroom satellite sensors, e.g. Landsat / Sentinel-2 striping) and a regular bright reseau
  grid every 4 px. Both are shared by all classes and achromatic, so every colour keeps its hue
  and every shape stays readable; only the domain moves. It plays EuroSAT's role: a task whose
  images come from a sensor far from the web photos CLIP was pretrained on, a shift shared by base
  and novel classes (its novel classes are ToyShapes' held-out compositions).

Determinism: every image draws from its own `numpy` generator keyed by (seed, dataset, split,
label, index), so the same seed writes identical images and byte-identical split files whatever
subset is generated; a manifest (`synthetic_world.json`, written last) makes a rerun a no-op.

CLI: `python -m perl_core.data.synthetic --root DIR [--seed 0] [--force]`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

# the world's definition (registered by the package perl_core.data); pretrain and the tests
# read it through this module too, hence __all__
from perl_core.data.toy_world import (BASE2NOVEL, BY_NAME, COLOURS, COUNTS, DATASETS,
                                      DEFAULT_SIZES, IMAGE_DIR, IMAGE_SIZE, PATTERNS, SHAPES,
                                      SHIFTED, STYLES, Scene, ToyDataset, classname,
                                      held_out_scenes, is_held_out, toy_dataset)

# Bump whenever rendering, class order or split layout changes: a world on disk with another
# version is regenerated instead of being silently reused.
GENERATOR_VERSION = 2
_SUPER = 2  # draw at 2x and box-downsample: anti-aliased edges at 48 px
MANIFEST = "synthetic_world.json"

SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------------------
# rendering


def _key(text: str) -> int:
    # a stable 32-bit id (Python's hash() is salted per process)
    return zlib.crc32(text.encode())


def image_rng(seed: int, *parts: str | int) -> np.random.Generator:
    """The generator of one image: keyed by its identity, not by generation order."""
    return np.random.default_rng([int(seed)] + [p if isinstance(p, int) else _key(p)
                                                for p in parts])


def _shape_mask(shape: str, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator,
                size: int) -> Image.Image:
    """An L-mode mask (255 inside) of one shape of radius r (pixels) centred at (cx, cy)."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    ca, sa = math.cos(angle), math.sin(angle)

    def poly(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in points]

    if shape == "circle":
        a = rng.uniform(0.9, 1.1)  # slight ellipse, rotated like the others
        d.polygon(poly((0.9 * a * math.cos(t), 0.9 / a * math.sin(t))
                       for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)), fill=255)
    elif shape == "square":
        h = 0.78
        d.polygon(poly([(-h, -h), (h, -h), (h, h), (-h, h)]), fill=255)
    elif shape == "triangle":
        d.polygon(poly((math.sin(t), -math.cos(t) + 0.15)
                       for t in (0, 2 * math.pi / 3, 4 * math.pi / 3)), fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            t = k * math.pi / 5
            rad = 1.0 if k % 2 == 0 else 0.45
            pts.append((rad * math.sin(t), -rad * math.cos(t) + 0.05))
        d.polygon(poly(pts), fill=255)
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        xs = 16 * np.sin(ts) ** 3 / 17
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts)) / 17
        d.polygon(poly(zip(xs.tolist(), (ys + 0.1).tolist())), fill=255)
    elif shape == "cross":
        w, e = 0.32, 0.92
        d.polygon(poly([(-w, -e), (w, -e), (w, -w), (e, -w), (e, w), (w, w), (w, e), (-w, e),
                        (-w, w), (-e, w), (-e, -w), (-w, -w)]), fill=255)
    elif shape == "moon":
        circle = [(0.92 * math.cos(t), 0.92 * math.sin(t))
                  for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
        d.polygon(poly(circle), fill=255)
        d.polygon(poly((x * 0.85 + 0.5, y * 0.85 - 0.15) for x, y in circle), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return mask


def _jitter_colour(name: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.array(COLOURS[name], dtype=np.float64)
    c = base * rng.uniform(0.8, 1.1) + rng.normal(0, 12, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255).round())


def _background(rng: np.random.Generator, size: int, style: str) -> Image.Image:
    """A smooth random grey-ish gradient (photo/clutter) or near-white paper (sketch)."""
    if style == "sketch":
        level = rng.uniform(215, 250)
        coarse = level + rng.normal(0, 4, (3, 3, 1)) + rng.normal(0, 3, (1, 1, 3))
    else:
        level = rng.uniform(20, 235)
        coarse = level + rng.normal(0, 18, (4, 4, 1)) + rng.normal(0, 10, (4, 4, 3))
    small = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB")
    return small.resize((size, size), Image.Resampling.BICUBIC)


def _clutter(img: Image.Image, rng: np.random.Generator, n_lines: int, n_blobs: int) -> None:
    """Desaturated lines and blobs: busy, but never in a class colour at full saturation."""
    size = img.size[0]
    d = ImageDraw.Draw(img)

    def dull() -> tuple[int, int, int]:
        g = rng.uniform(40, 220)
        c = 0.3 * rng.uniform(0, 255, 3) + 0.7 * g
        return tuple(int(v) for v in c)

    for _ in range(n_blobs):
        x, y = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.05, 0.18, 2) * size
        box = [x - rx, y - ry, x + rx, y + ry]
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=dull())
    for _ in range(n_lines):
        x0, y0, x1, y1 = rng.uniform(-0.1, 1.1, 4) * size
        d.line([(x0, y0), (x1, y1)], fill=dull(), width=int(rng.integers(2, 6)))


def _texture_mask(pattern: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A boolean full-frame pattern, rotated, with random period and phase."""
    theta = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    p = rng.uniform(0.11, 0.2) * size  # period: 5-10 px at 48 px
    ph = rng.uniform(0, 1, 2)
    if pattern == "stripes":
        return np.mod(v / p + ph[0], 1.0) < rng.uniform(0.4, 0.6)
    if pattern == "checks":
        return (np.floor(u / p + ph[0]) + np.floor(v / p + ph[1])) % 2 == 0
    if pattern == "dots":
        du = np.mod(u / p + ph[0], 1.0) - 0.5
        dv = np.mod(v / p + ph[1], 1.0) - 0.5
        return du * du + dv * dv < rng.uniform(0.22, 0.32) ** 2
    if pattern == "waves":
        amp, lam = rng.uniform(0.3, 0.6) * p, rng.uniform(1.6, 3.0) * p
        return np.mod((v + amp * np.sin(2 * math.pi * u / lam)) / p + ph[0], 1.0) < 0.45
    raise ValueError(f"unknown pattern {pattern!r}; known: {PATTERNS}")


def _place(rng: np.random.Generator, radii: Sequence[float],
           size: int) -> list[tuple[float, float]]:
    """Non-overlapping centres (rejection sampling; deterministic for a given rng)."""
    for _ in range(200):
        centres: list[tuple[float, float]] = []
        for r in radii:
            for _ in range(100):
                c = tuple(rng.uniform(r + 1, size - r - 1, 2))
                if all(math.dist(c, o) > 1.1 * (r + ro) + 2 for o, ro in zip(centres, radii)):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
    raise RuntimeError(f"could not place {len(radii)} shapes of radii {radii} in {size} px")


def render_scene(scene: Scene, rng: np.random.Generator,
                 image_size: int = IMAGE_SIZE) -> Image.Image:
    """Draw one random instance of `scene` (an RGB PIL image of image_size x image_size)."""
    S = image_size * _SUPER
    style = scene.style
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {STYLES}")
    img = _background(rng, S, style)
    if style == "clutter":
        _clutter(img, rng, n_lines=int(rng.integers(6, 12)), n_blobs=int(rng.integers(3, 7)))

    if scene.kind == "texture":
        fg = np.array(_jitter_colour(scene.colour, rng), dtype=np.uint8)
        mask = _texture_mask(scene.pattern, rng, S)
        if style == "sketch":  # only the pattern's edges
            m = Image.fromarray(mask.astype(np.uint8) * 255, "L")
            mask = np.asarray(ImageChops.subtract(m, m.filter(ImageFilter.MinFilter(3)))) > 0
        arr = np.array(img)
        arr[mask] = fg
        img = Image.fromarray(arr, "RGB")
    else:
        if scene.kind == "object":
            shapes = [scene.shape]
            lo, hi = (0.17, 0.28) if style == "clutter" else (0.22, 0.40)
            radii = [rng.uniform(lo, hi) * S]
        elif scene.kind == "count":
            n = COUNTS[scene.count]
            shapes = [scene.shape] * n
            radii = list(rng.uniform(0.09, 0.125, n) * S)
        else:
            raise ValueError(f"unknown scene kind {scene.kind!r}")
        colour_name = scene.colour or str(rng.choice(list(COLOURS)))
        colour = _jitter_colour(colour_name, rng)
        centres = _place(rng, radii, S)
        for shape, r, (cx, cy) in zip(shapes, radii, centres):
            mask = _shape_mask(shape, cx, cy, r, rng.uniform(-0.5, 0.5), rng, S)
            if style == "sketch":  # outline only: the mask minus its erosion
                mask = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(5)))
            img.paste(colour, mask=mask)
        if style == "clutter":  # lines across the object too
            _clutter(img, rng, n_lines=int(rng.integers(1, 3)), n_blobs=0)

    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    sigma = {"photo": (3, 12), "sketch": (2, 5), "clutter": (15, 30), "sensor": (3, 12)}[style]
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, rng.uniform(*sigma),
                                                         (image_size, image_size, 3))
    if style == "sensor":
        arr = _sensor(arr, rng)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")


def _sensor(arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The "sensor" style on a rendered photo (float HxWx3): per-column striping and a reseau grid.

    Both are achromatic (the same offset / blend on R, G and B), so hue is kept: a red circle stays
    red, only brighter or darker in some columns and crossed by light grid lines."""
    size = arr.shape[0]
    arr = arr + rng.normal(0, 25, (1, size, 1))  # column offsets (detector non-uniformity)
    yy, xx = np.mgrid[0:size, 0:size]
    grid = ((yy % 4 == 0) | (xx % 4 == 0))[..., None]  # fixed 4 px reseau, 50 % light grey
    return np.where(grid, 0.5 * arr + 0.5 * 235.0, arr)


# ------------------------------------------------------------------------------------------------
# writing the world


def _class_dir(name: str) -> str:
    return name.replace(" ", "_")


def _sizes(d: ToyDataset, sizes: dict | None) -> dict[str, int]:
    out = dict(d.sizes)
    if sizes:
        unknown = set(sizes) - set(SPLITS)
        if unknown:
            raise ValueError(f"sizes has unknown split(s) {sorted(unknown)}; splits: {SPLITS}")
        out.update({k: int(v) for k, v in sizes.items()})
    if d.test_only:
        out["train"] = out["val"] = 0
    return out


def _write_dataset(d: ToyDataset, root: Path, seed: int, sizes: dict[str, int]) -> dict:
    out_dir = root / d.dataset_dir
    if out_dir.exists():  # our own folder: stale images of another version or seed must go
        shutil.rmtree(out_dir)
    img_root = out_dir / IMAGE_DIR
    names = d.classnames()
    split: dict[str, list] = {s: [] for s in SPLITS}
    for label, cname in enumerate(names):
        scene = d.scene(label)
        cdir = img_root / _class_dir(cname)
        cdir.mkdir(parents=True, exist_ok=True)
        for s in SPLITS:
            for k in range(sizes[s]):
                # named by (split, index) like the image's RNG key, so a small world's files
                # are exactly the full world's files of the same name
                rel = f"{_class_dir(cname)}/{s}_{k:04d}.png"
                img = render_scene(scene, image_rng(seed, d.name, s, label, k))
                img.save(img_root / rel, format="PNG")
                split[s].append([rel, label, cname])
    # CoOp's files are not sorted by label (few-shot sampling walks them in file order)
    for s in SPLITS:
        order = image_rng(seed, d.name, "order", s).permutation(len(split[s]))
        split[s] = [split[s][i] for i in order]
    (out_dir / d.split_file).write_text(json.dumps(split))
    return {"dataset_dir": d.dataset_dir, "classes": len(names), "num_base": d.num_base(),
            **{s: len(split[s]) for s in SPLITS}}


def split_path(root: str | Path, name: str) -> Path:
    """Where the split file of synthetic dataset `name` lives under `root`."""
    d = toy_dataset(name)
    return Path(root) / d.dataset_dir / d.split_file


def generate_world(root: str | Path, seed: int = 0, force: bool = False, *,
                   datasets: Sequence[str] | None = None, sizes: dict | None = None,
                   verbose: bool = False) -> dict:
    """Write the synthetic benchmarks under `root` (CoOp layout) and return the manifest.

    Cached: when `root/synthetic_world.json` records the same generator version, seed, datasets and
    sizes (and the split files exist), nothing is written. `datasets` (default: all) and `sizes`
    (per-split image count per class, e.g. {"test": 8}; default 20/6/24) make small worlds for
    tests; the images they hold are the same as in the full world.
    """
    if not str(root):
        raise ValueError("generate_world needs a root folder (got an empty path)")
    root = Path(root)
    wanted = [toy_dataset(n).name for n in datasets] if datasets else [d.name for d in DATASETS]
    plan = {n: _sizes(BY_NAME[n], sizes) for n in wanted}
    manifest_path = root / MANIFEST
    if manifest_path.is_file() and not force:
        try:
            old = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            old = {}
        same = (old.get("generator_version") == GENERATOR_VERSION and old.get("seed") == seed
                and old.get("image_size") == IMAGE_SIZE and old.get("sizes") == plan
                and all(split_path(root, n).is_file() for n in plan))
        if same:
            return {**old, "generated": False}
        if verbose:
            print(f"{manifest_path}: another version, seed or dataset set; regenerating")
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # written last: a crash leaves no stale manifest
    t0 = time.time()
    info = {}
    for n in wanted:
        info[n] = _write_dataset(BY_NAME[n], root, seed, plan[n])
        if verbose:
            print(f"  {n}: {info[n]}")
    manifest = {"generator_version": GENERATOR_VERSION, "seed": seed, "image_size": IMAGE_SIZE,
                "sizes": plan, "datasets": info,
                "held_out": {k: [classname(s) for s in v] for k, v in held_out_scenes().items()}}
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if verbose:
        print(f"wrote {sum(sum(v[s] for s in SPLITS) for v in info.values())} images in "
              f"{time.time() - t0:.1f} s under {root}")
    return {**manifest, "generated": True}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perl_core.data.synthetic",
                                 description="Generate the synthetic CoOp-format world.")
    ap.add_argument("--root", required=True, help="data root to write the datasets under")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="regenerate even if cached")
    ap.add_argument("--datasets", nargs="*", help=f"subset (default: all of {list(BY_NAME)})")
    args = ap.parse_args(argv)
    m = generate_world(args.root, seed=args.seed, force=args.force, datasets=args.datasets,
                       verbose=True)
    if not m["generated"]:
        print(f"{args.root}: up to date (generator v{GENERATOR_VERSION}, seed {args.seed}); "
              f"--force to regenerate")
    return 0


__all__ = ["generate_world", "render_scene", "image_rng", "split_path", "main", "MANIFEST",
           "GENERATOR_VERSION", "SPLITS",
           # the world's definition (perl_core.data.toy_world)
           "Scene", "ToyDataset", "DATASETS", "BY_NAME", "BASE2NOVEL", "SHIFTED", "COLOURS",
           "SHAPES", "PATTERNS", "COUNTS", "STYLES", "DEFAULT_SIZES", "IMAGE_SIZE", "IMAGE_DIR",
           "classname", "toy_dataset", "held_out_scenes", "is_held_out"]

if __name__ == "__main__":
    raise SystemExit(main())
