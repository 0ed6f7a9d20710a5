"""Issue 15: the embedded default has a benchmark on which PERL's effect is visible.

ToyShapesSensor (`perl_core/data/synthetic.py`, style "sensor") is ToyShapes seen through a
striped, gridded sensor that perl-tiny's pretraining never rendered: zero-shot drops from
69.2 / 76.2 (ToyShapes) to 53.8 / 55.4 (base / novel). 16-shot PERL with the toy twin's settings
(`sweeps/toy/base2novel.yaml`: K=4, J=7, 5 epochs, flips only, lr 1e-2) recovers part of it on
both halves; measured over seeds 1-3 (docs/method.md, "Toy world with a domain shift"):
base 55.8 ± 1.5, novel 58.8 ± 1.7; seed 1 (this test): base +0.8, novel +1.7 points over step 0,
HM +1.2.

The margins below are set from those numbers: with seed 1 fixed the run is deterministic, so the
test asserts seed 1's gain minus half a test image of slack on each half (one image is 0.42
points). They are small because the measured gain is small; they still separate a working
recurrence from a broken one. Checked by monkeypatching `perl_core.model.PerlModel` in scratch runs
(see the issue-15 note in docs/method.md): (a) thought tokens never inserted -> PERL == step 0,
gain 0, fails; (b) readout at the thought position instead of CLS -> fails; (c) projector output
detached (no gradient reaches the projectors) -> fails. (a) and (c) make the loss
gradient-free, so `fit` raises in `backward`; (b) trains to base 37.5 / novel 20.8.
"""

from __future__ import annotations

import pytest

from perl_core import TrainConfig
from perl_core.data import synthetic as syn
from perl_core.train import fit

MARGIN_BASE = 0.6  # points over zero-shot (seed 1 measured +0.83)
MARGIN_NOVEL = 1.2  # seed 1 measured +1.67
MARGIN_HM = 0.6  # seed 1 measured +1.2


def _embedded_available() -> bool:
    from perl_core.factory import EMBEDDED_WEIGHTS

    return EMBEDDED_WEIGHTS.is_file()


needs_weights = pytest.mark.skipif(not _embedded_available(),
                                   reason="perl_core/assets/perl-tiny.safetensors not built yet")


def _hm(b: float, n: float) -> float:
    return 2 * b * n / (b + n)


def sensor_cfg(root, seed: int = 1) -> TrainConfig:
    """The toy twin's base2novel cell on ToyShapesSensor (sweeps/toy/base2novel.yaml)."""
    return TrainConfig(dataset="ToyShapesSensor", data_root=str(root), arch="perl-tiny",
                       pretrained="embedded", shots=16, inject_layer=7, num_steps=4, rank=1,
                       anchor_weight=1.0, lr=1e-2, batch_size=4, epochs=5, aug_scale_min=1.0,
                       seed=seed, device="cpu")


@pytest.fixture(scope="module")
def sensor_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensor_world")
    # the full-size dataset (1,000 images, ~1 s): the same images as runs/world's
    syn.generate_world(root, seed=0, datasets=["ToyShapesSensor"])
    return root


def test_sensor_style_keeps_colours_and_is_unseen():
    d = syn.toy_dataset("ToyShapesSensor")
    assert d.style == "sensor" and d.classnames() == syn.toy_dataset("ToyShapes").classnames()
    assert d.num_base() == 10 and not d.test_only
    # the novel classes are ToyShapes' held-out compositions
    assert all(syn.is_held_out(d.scene(y)) for y in range(d.num_base(), len(d.cells())))
    # achromatic shift: the object's hue survives (red stays the most saturated channel, etc.)
    import numpy as np
    for y, colour in [(0, "red"), (d.classnames().index("blue star"), "blue")]:
        img = np.asarray(syn.render_scene(d.scene(y), syn.image_rng(0, "t", y)), dtype=float)
        chroma = img.max(-1) - img.min(-1)
        obj = img[chroma > np.percentile(chroma, 85)].mean(0)
        assert int(obj.argmax()) == {"red": 0, "blue": 2}[colour]


@pytest.mark.slow
@needs_weights
def test_perl_beats_zero_shot_on_the_shifted_toy_set(sensor_world, one_thread):
    m = fit(sensor_cfg(sensor_world)).metrics
    b0, n0 = m["base/acc_step0"], m["novel/acc_step0"]
    b, n = m["base/acc"], m["novel/acc"]
    # the shift is real: zero-shot well below unshifted ToyShapes (69.2 / 76.2)
    assert b0 < 60 and n0 < 62, (b0, n0)
    assert b >= b0 + MARGIN_BASE, f"base: PERL {b:.2f} vs zero-shot {b0:.2f}"
    assert n >= n0 + MARGIN_NOVEL, f"novel: PERL {n:.2f} vs zero-shot {n0:.2f}"
    assert _hm(b, n) >= _hm(b0, n0) + MARGIN_HM
