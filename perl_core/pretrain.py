"""Pretrain the embedded tiny CLIP (`perl-tiny`) contrastively on captioned images of the
synthetic world.

Why: no CLIP weights can be downloaded in CI or on a laptop, and random weights give chance
accuracy, which hides bugs. This command makes a small CLIP whose zero-shot accuracy on the toy
benchmarks (`perl_core.data.synthetic`) is far above chance, including on their novel classes.

    python -m perl_core.pretrain --world-root runs/world \
        --out perl_core/assets/perl-tiny.safetensors
    python -m perl_core.pretrain --eval-only --world-root runs/world      # zero-shot table

Data: a pool of images rendered by the world's own renderer under a *separate* key (seed and the
tag "pretrain"), never the benchmark images. Each time an image is drawn it gets a fresh caption:
the whole composition ("a photo of a red circle.", "two red circles", "red, circle", "a red
stripes pattern.") or a single word alone ("red.", "a photo of a circle.") so that every word is
grounded by itself. The compositions in `synthetic.held_out_scenes()` (the novel classes of
ToyShapes, ToyPatterns and ToyCounts) are never drawn, so zero-shot on them needs composition.

Loss: CLIP's symmetric InfoNCE with a trainable logit scale, except that a caption is a positive
for *every* image it is true of (its words are a subset of the image's words: "red" is true of a
red star), with the target spread evenly over the positives. A small caption vocabulary makes
such duplicates common within a batch; plain InfoNCE would push true pairs apart.

Determinism: the same seed, arguments, thread count and torch build give the same weights.
The weights are stored in float16 (half the file size); `load_state_dict` upcasts them into the
fp32 model, and the zero-shot numbers in the metadata are measured after that round trip.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from perl_core.data import synthetic as syn

ARCH = "perl-tiny"
PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "model_configs"
DEFAULT_WEIGHTS = PACKAGE_DIR / "assets" / "perl-tiny.safetensors"
GENERIC_TEMPLATE = "a photo of a {}."
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP normalisation (open_clip's OPENAI_DATASET_*)
STD = (0.26862954, 0.26130258, 0.27577711)

# Caption templates. The generic template and every toy dataset's CoOp-style template are among
# them, so the evaluation prompts are in-distribution for the text tower.
TEMPLATES = ("a photo of a {}.", "a {}.", "{}", "{}.", "a picture of a {}.", "an image of a {}.",
             "a photo of the {}.", "a photo of {}.")
KIND_TEMPLATES = {"texture": ("a {} pattern.", "{} texture."), "count": ("a photo of {}.",),
                  "object": ()}
STYLE_TEMPLATES = {"sketch": ("a sketch of a {}.", "a drawing of a {}."),
                   "clutter": ("a cluttered photo of a {}.",)}
WORD_ORDER = ("count", "colour", "shape", "shapes", "pattern")


def register_config() -> None:
    """Make `perl-tiny` (perl_core/model_configs) known to open_clip."""
    if ARCH not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def create_model() -> open_clip.CLIP:
    """A randomly initialised perl-tiny (seed torch first for a reproducible init)."""
    register_config()
    return open_clip.create_model(ARCH, pretrained=None, device="cpu")


def load_tiny_clip(weights: str | Path = DEFAULT_WEIGHTS) -> open_clip.CLIP:
    """perl-tiny with the given (default: the embedded) weights, fp32, eval mode."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"tiny CLIP weights {weights} not found (build them with "
                                f"`python -m perl_core.pretrain --world-root DIR --out {weights}`)")
    model = create_model()
    open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# pretraining data


def sample_scene(rng: np.random.Generator) -> syn.Scene:
    """A random pretraining scene over the whole vocabulary, never a held-out composition."""
    colours, shapes = list(syn.COLOURS), list(syn.SHAPES)
    while True:
        u = rng.random()
        # 35 % objects, 40 % counts (counting is the slowest skill to learn), 25 % textures
        if u < 0.35:
            style = str(rng.choice(["photo", "sketch", "clutter"], p=[0.76, 0.12, 0.12]))
            scene = syn.Scene("object", colour=str(rng.choice(colours)),
                              shape=str(rng.choice(shapes)), style=style)
        elif u < 0.75:
            scene = syn.Scene("count", count=str(rng.choice(list(syn.COUNTS))),
                              shape=str(rng.choice(shapes)), colour=str(rng.choice(colours)),
                              style="sketch" if rng.random() < 0.1 else "photo")
        else:
            scene = syn.Scene("texture", pattern=str(rng.choice(list(syn.PATTERNS))),
                              colour=str(rng.choice(colours)),
                              style="sketch" if rng.random() < 0.1 else "photo")
        if not syn.is_held_out(scene):
            return scene


def scene_attributes(scene: syn.Scene) -> frozenset[tuple[str, str]]:
    """What is true of the image: its words, plus its style when it is not a plain photo."""
    attrs = set(scene.words().items())
    if scene.style != "photo":
        attrs.add(("style", scene.style))
    return frozenset(attrs)


def _phrase(words: dict[str, str]) -> str:
    return " ".join(words[k] for k in WORD_ORDER if k in words)


def sample_caption(scene: syn.Scene, rng: np.random.Generator) -> tuple[str, frozenset]:
    """(caption text, the attributes it claims). Whole compositions and single words alone."""
    words = scene.words()
    u = rng.random()
    if u < 0.55:  # the whole composition (counts: with or without the colour)
        claim = dict(words)
        if scene.kind == "count" and rng.random() < 0.5:
            claim.pop("colour")
    elif u < 0.85:  # one word alone: grounds each word by itself
        k = str(rng.choice(sorted(words)))
        claim = {k: words[k]}
    else:  # any subset of two words, or a bare comma list of all of them
        keys = sorted(words)
        if rng.random() < 0.5 and len(keys) > 2:
            keys = sorted(rng.choice(keys, 2, replace=False).tolist())
            claim = {k: words[k] for k in keys}
        else:
            claim = dict(words)
            order = rng.permutation(len(claim))
            vals = [claim[k] for k in WORD_ORDER if k in claim]
            return ", ".join(vals[i] for i in order), frozenset(claim.items())
    attrs = set(claim.items())
    style_t = STYLE_TEMPLATES.get(scene.style, ())
    if style_t and rng.random() < 0.5:
        template = str(rng.choice(style_t))
        attrs.add(("style", scene.style))
    else:
        template = str(rng.choice(TEMPLATES + KIND_TEMPLATES[scene.kind]))
    return template.format(_phrase(claim)), frozenset(attrs)


def _render_pool(n: int, seed: int, log) -> tuple[torch.Tensor, list[syn.Scene]]:
    """n pretraining images (uint8, N x 3 x H x W) keyed by (seed, "pretrain", i)."""
    t0 = time.time()
    scene_rng = syn.image_rng(seed, "pretrain", "scenes")
    scenes = [sample_scene(scene_rng) for _ in range(n)]
    s = syn.IMAGE_SIZE
    pool = torch.empty((n, 3, s, s), dtype=torch.uint8)
    for i, sc in enumerate(scenes):
        img = syn.render_scene(sc, syn.image_rng(seed, "pretrain", "image", i))
        pool[i] = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        if (i + 1) % 10000 == 0:
            log(f"  rendered {i + 1}/{n} ({time.time() - t0:.0f} s)")
    return pool, scenes


def _normalise(x_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x_uint8.float() / 255.0 - mean) / std


def _augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flip (every shape is mirror-symmetric or, like the moon, still itself)
    and a small translation with edge replication."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    p = max_shift
    padded = F.pad(x, (p, p, p, p), mode="replicate")
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # n x h
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # n x w
    idx_n = torch.arange(n).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)].permute(
        0, 3, 1, 2).contiguous()


class _Vocab:
    """Caption tokens (cached) and attribute bitmasks for the batch positive matrix."""

    def __init__(self, context_length: int):
        self.context_length = context_length
        self.tokens: dict[str, torch.Tensor] = {}
        self.bits: dict[tuple[str, str], int] = {}

    def tok(self, text: str) -> torch.Tensor:
        t = self.tokens.get(text)
        if t is None:
            t = open_clip.tokenize([text], context_length=self.context_length)[0]
            if t[-1] not in (0, 49407):  # open_clip truncates silently; a cut caption lies
                raise ValueError(f"caption {text!r} does not fit context_length "
                                 f"{self.context_length}")
            self.tokens[text] = t
        return t

    def mask(self, attrs: frozenset) -> int:
        m = 0
        for a in attrs:
            if a not in self.bits:
                self.bits[a] = len(self.bits)
                if len(self.bits) > 62:
                    raise ValueError("more than 62 distinct attributes; widen the bitmask")
            m |= 1 << self.bits[a]
        return m


def multi_positive_clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                             positive: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on normalised features; positive[i, j]: caption j is true of image i."""
    logits = logit_scale * img @ txt.T
    pos = positive.float()
    i2t = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    t2i = -(pos.T / pos.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
    return (i2t + t2i) / 2


# ------------------------------------------------------------------------------------------------
# zero-shot evaluation (plain open_clip: encode_image / encode_text)


def _load_test(world_root: Path, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    d = syn.toy_dataset(name)
    split_file = syn.split_path(world_root, d.name)
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file} not found; generate the world first "
                                f"(python -m perl_core.data.synthetic --root {world_root})")
    items = json.loads(split_file.read_text())["test"]
    img_root = split_file.parent / syn.IMAGE_DIR
    s = syn.IMAGE_SIZE
    x = torch.empty((len(items), 3, s, s), dtype=torch.uint8)
    for i, (rel, _, _) in enumerate(items):
        im = Image.open(img_root / rel).convert("RGB")
        if im.size != (s, s):
            im = im.resize((s, s), Image.Resampling.BICUBIC)
        x[i] = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    y = torch.tensor([int(it[1]) for it in items])
    return x, y, d.classnames()


@torch.no_grad()
def _text_features(model, classnames: Sequence[str], template: str) -> torch.Tensor:
    tokens = open_clip.tokenize([template.format(c) for c in classnames],
                                context_length=model.context_length)
    return F.normalize(model.encode_text(tokens), dim=-1)


@torch.no_grad()
def _image_features(model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([F.normalize(model.encode_image(_normalise(x[i:i + batch_size])), dim=-1)
                      for i in range(0, len(x), batch_size)])


def _acc(img_f, txt_f, y) -> float:
    if not len(y):
        return float("nan")
    return 100.0 * float(((img_f @ txt_f.T).argmax(1) == y).float().mean())


@torch.no_grad()
def evaluate_zero_shot(model, world_root: str | Path, datasets: Sequence[str] | None = None,
                       template: str | None = GENERIC_TEMPLATE) -> dict[str, dict[str, float]]:
    """Zero-shot top-1 (%) per dataset on its test split: `all` (n-way), and for base2novel-able
    datasets `base` (base images, base-only classifier) and `novel` (novel images, novel-only
    classifier), with `chance_*` = 100 / classes. `template=None`: each dataset's own template."""
    model.eval()
    world_root = Path(world_root)
    names = list(datasets) if datasets else [d.name for d in syn.DATASETS]
    out = {}
    for name in names:
        d = syn.toy_dataset(name)
        x, y, classnames = _load_test(world_root, d.name)
        txt = _text_features(model, classnames, template or d.template)
        img = _image_features(model, x)
        n, m = len(classnames), d.num_base()
        r = {"all": _acc(img, txt, y), "chance_all": 100.0 / n}
        if not d.test_only:
            b, nv = y < m, y >= m
            r.update(base=_acc(img[b], txt[:m], y[b]), novel=_acc(img[nv], txt[m:], y[nv] - m),
                     chance_base=100.0 / m, chance_novel=100.0 / (n - m))
        out[d.name] = r
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = ["| dataset | base | novel | all | chance (base / novel / all) | novel / chance |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "base" in r:
            lines.append(f"| {name} | {r['base']:.1f} | {r['novel']:.1f} | {r['all']:.1f} | "
                         f"{r['chance_base']:.1f} / {r['chance_novel']:.1f} / {r['chance_all']:.1f}"
                         f" | {r['novel'] / r['chance_novel']:.1f}x |")
        else:
            lines.append(f"| {name} | - | - | {r['all']:.1f} | - / - / {r['chance_all']:.1f} | - |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# training


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        # gains, biases, the temperature and the embedding tables are not decayed (open_clip's
        # rule, plus embeddings: most token rows are never used and should not shrink to 0)
        if p.ndim < 2 or "embedding" in n or "logit_scale" in n or n.endswith("class_embedding"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def pretrain(steps: int, batch_size: int, seed: int, pool_size: int, lr: float,
             weight_decay: float, warmup: int, world_root: Path | None, eval_every: int,
             max_minutes: float | None, log=print) -> tuple[open_clip.CLIP, dict]:
    torch.manual_seed(seed)
    model = create_model()
    model.train()
    vocab = _Vocab(model.context_length)
    log(f"perl-tiny: {sum(p.numel() for p in model.parameters()):,} parameters; rendering "
        f"{pool_size} pretraining images (seed {seed})")
    pool, scenes = _render_pool(pool_size, seed, log)
    img_masks = torch.tensor([vocab.mask(scene_attributes(s)) for s in scenes], dtype=torch.int64)
    rng = syn.image_rng(seed, "pretrain", "batches")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98),
                            eps=1e-6)
    max_logit = math.log(100.0)
    t0 = time.time()
    done = 0
    history = []
    for step in range(steps):
        frac = step / max(1, warmup) if step < warmup else 0.5 * (
            1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * frac
        idx = rng.choice(pool_size, batch_size, replace=False)
        caps = [sample_caption(scenes[i], rng) for i in idx]
        tokens = torch.stack([vocab.tok(c) for c, _ in caps])
        cap_masks = torch.tensor([vocab.mask(a) for _, a in caps], dtype=torch.int64)
        im = img_masks[torch.from_numpy(idx)]
        positive = (cap_masks.view(1, -1) & ~im.view(-1, 1)) == 0  # caption j's words in image i
        x = _normalise(_augment(pool[torch.from_numpy(idx)].float(), gen))
        img_f, txt_f, scale = model(x, tokens)
        loss = multi_positive_clip_loss(img_f, txt_f, scale, positive)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_logit)
        done = step + 1
        if done % 50 == 0 or done == 1:
            el = time.time() - t0
            log(f"step {done}/{steps} loss {loss.item():.4f} scale {scale.item():.1f} "
                f"lr {lr * frac:.2e} {done * batch_size / el:.0f} img/s {el / 60:.1f} min")
        if world_root is not None and eval_every and done % eval_every == 0 and done < steps:
            r = evaluate_zero_shot(model, world_root, syn.BASE2NOVEL)
            model.train()
            history.append({"step": done, **{f"{k}/{m}": round(v, 2) for k, d in r.items()
                                             for m, v in d.items() if not m.startswith("chance")}})
            log("eval " + json.dumps(history[-1]))
        if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
            log(f"stopping at step {done}: --max-minutes {max_minutes} reached")
            break
    model.eval()
    info = {"steps": done, "steps_planned": steps, "train_seconds": round(time.time() - t0, 1),
            "history": history}
    return model, info


def save_weights(model, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    # float16 halves the file; load_state_dict copies into the fp32 model, upcasting
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={k: v if isinstance(v, str) else json.dumps(v)
                                       for k, v in metadata.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perl_core.pretrain",
                                 description="Pretrain (or evaluate) the embedded tiny CLIP.")
    ap.add_argument("--world-root", required=True,
                    help="synthetic world for evaluation (generated there if missing)")
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS), help="weights file to write")
    ap.add_argument("--steps", type=int, default=1300)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool-size", type=int, default=30000, help="pretraining images rendered")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="safety bound: stop early (the run is then not reproducible by steps)")
    ap.add_argument("--eval-only", action="store_true", help="only print the zero-shot table")
    ap.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="weights for --eval-only")
    ap.add_argument("--json", help="also write the zero-shot results to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    world = Path(args.world_root)
    syn.generate_world(world, seed=0)  # cached; the model card's numbers are on world seed 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.eval_only:
        model = load_tiny_clip(args.weights)
        results = {"generic": evaluate_zero_shot(model, world),
                   "dataset_template": evaluate_zero_shot(model, world, template=None)}
    else:
        t_start = time.time()
        model, info = pretrain(args.steps, args.batch_size, args.seed, args.pool_size, args.lr,
                               args.weight_decay, args.warmup, world, args.eval_every,
                               args.max_minutes, log)
        out = Path(args.out)
        meta = {"arch": ARCH, "model_config": json.loads((CONFIG_DIR / f"{ARCH}.json").read_text()),
                "dtype": "float16", "seed": args.seed, "batch_size": args.batch_size,
                "pool_size": args.pool_size, "lr": args.lr, "weight_decay": args.weight_decay,
                "warmup": args.warmup, "threads": args.threads,
                "generator_version": syn.GENERATOR_VERSION,
                "held_out": {k: [syn.classname(s) for s in v]
                             for k, v in syn.held_out_scenes().items()},
                "torch": torch.__version__, "open_clip": open_clip.__version__,
                "python": platform.python_version(), **info}
        save_weights(model, out, meta)
        # measure what was saved: the fp16 round trip, loaded the way users load it
        model = load_tiny_clip(out)
        results = {"generic": evaluate_zero_shot(model, world),
                   "dataset_template": evaluate_zero_shot(model, world, template=None)}
        meta["zero_shot"] = results
        meta["total_seconds"] = round(time.time() - t_start, 1)
        save_weights(model, out, meta)
        log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) after {meta['total_seconds']} s")
    print("\nzero-shot, generic template \"a photo of a {}.\":")
    print(format_table(results["generic"]))
    print("\nzero-shot, each dataset's own template:")
    print(format_table(results["dataset_template"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
