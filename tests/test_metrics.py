"""perl_core.metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from perl_core import metrics as M

LN2, LN3 = math.log(2.0), math.log(3.0)


def _logits_from_probs(p: list[list[float]]) -> torch.Tensor:
    return torch.tensor(p).log()


# two samples, three classes; softmax(log p) = p
P = [[0.5, 0.25, 0.25],  # label 0: correct, p_y = .5
     [0.2, 0.6, 0.2]]  # label 2: wrong, p_y = .2
LABELS = torch.tensor([0, 2])


def test_accuracy_confidence_brier_by_hand():
    logits = _logits_from_probs(P)
    assert M.accuracy(logits, LABELS) == pytest.approx(50.0)
    assert M.mean_confidence(logits, LABELS) == pytest.approx(100 * (0.5 + 0.2) / 2)
    # sample 1: (.5-1)^2 + .25^2 + .25^2 = .375 ; sample 2: .2^2 + .6^2 + (.2-1)^2 = 1.04
    assert M.brier_score(logits, LABELS) == pytest.approx((0.375 + 1.04) / 2)
    assert M.brier(logits, LABELS).tolist() == pytest.approx([0.375, 1.04])


def test_brier_extremes():
    sure_right = torch.tensor([[100.0, 0.0]])
    sure_wrong = torch.tensor([[0.0, 100.0]])
    y = torch.tensor([0])
    assert M.brier_score(sure_right, y) == pytest.approx(0.0, abs=1e-6)
    assert M.brier_score(sure_wrong, y) == pytest.approx(2.0, abs=1e-6)


def test_kl_direction_and_value():
    p0 = _logits_from_probs([[0.5, 0.5]])
    pk = _logits_from_probs([[0.25, 0.75]])
    # KL(p_k || p_0) = .25 ln(.25/.5) + .75 ln(.75/.5)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert M.kl_drift(p0, pk) == pytest.approx(expected, rel=1e-5)
    assert M.kl_divergence(pk, p0).item() == pytest.approx(expected, rel=1e-5)
    # the other direction is a different number: the choice matters and is pinned here
    other = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert abs(expected - other) > 1e-3
    assert M.kl_drift(p0, p0) == pytest.approx(0.0, abs=1e-7)


def test_kl_is_stable_for_extreme_logits():
    a = torch.tensor([[1000.0, -1000.0]])
    b = torch.tensor([[-1000.0, 1000.0]])
    assert math.isfinite(M.kl_drift(a, b))
    assert M.kl_drift(a, b) == pytest.approx(2000.0, rel=1e-4)


def test_anchor_cosine():
    v0 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    vk = torch.tensor([[2.0, 0.0], [1.0, 1.0]])  # cos 1 and 1/sqrt2
    assert M.anchor_cosine(v0, vk) == pytest.approx((1 + 1 / math.sqrt(2)) / 2)


def test_harmonic_mean():
    assert M.harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert M.harmonic_mean(0.0, 0.0) == 0.0
    assert M.harmonic_mean(50.0, 0.0) == 0.0
    assert math.isnan(M.harmonic_mean(math.nan, 1.0))
    with pytest.raises(ValueError):
        M.harmonic_mean(-1.0, 2.0)


def test_per_step_and_per_class_accuracy():
    # steps 0..2 for 3 samples, 2 classes; labels [0, 1, 1]
    steps = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]],  # 1/3 correct
                          [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],  # 2/3
                          [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])  # 3/3
    y = torch.tensor([0, 1, 1])
    assert M.per_step_accuracy(steps, y) == pytest.approx([100 / 3, 200 / 3, 100.0])
    assert M.per_class_accuracy(steps[1], y, ["cat", "dog"]) == pytest.approx(
        {"cat": 100.0, "dog": 50.0})
    # a class without test samples is left out rather than reported as 0 or NaN
    assert M.per_class_accuracy(steps[1][:1], y[:1], ["cat", "dog"]) == {"cat": 100.0}


def test_step_metrics_keys_and_values():
    s0 = _logits_from_probs(P)
    s1 = _logits_from_probs([[0.8, 0.1, 0.1], [0.1, 0.1, 0.8]])  # both correct
    out = M.step_metrics(torch.stack([s0, s1]), LABELS, v0=torch.eye(2), vk=torch.eye(2))
    assert out["acc_step0"] == pytest.approx(50.0)
    assert out["acc_step1"] == out["acc"] == pytest.approx(100.0)
    assert out["confidence_step1"] == pytest.approx(80.0)
    assert out["brier_step1"] == pytest.approx(0.04 + 0.01 + 0.01)
    assert out["kl_step0"] == pytest.approx(0.0, abs=1e-7)
    kl1 = (0.8 * math.log(0.8 / 0.5) + 2 * 0.1 * math.log(0.1 / 0.25)
           + 0.1 * math.log(0.1 / 0.2) + 0.1 * math.log(0.1 / 0.6)
           + 0.8 * math.log(0.8 / 0.2)) / 2
    assert out["kl_step1"] == pytest.approx(kl1, rel=1e-5)
    assert out["anchor_cos"] == pytest.approx(1.0)
    assert out["n"] == 2


def test_accumulator_equals_one_shot_over_batches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 37, 5, generator=g) * 3
    labels = torch.randint(0, 5, (37,), generator=g)
    v0, vk = torch.randn(37, 8, generator=g), torch.randn(37, 8, generator=g)
    whole = M.step_metrics(logits, labels, v0, vk)
    acc = M.StepMetricAccumulator(num_classes=5)
    for sl in (slice(0, 10), slice(10, 11), slice(11, 37)):
        acc.update(logits[:, sl], labels[sl], v0[sl], vk[sl])
    streamed = acc.compute()
    assert streamed.keys() == whole.keys()
    for k in whole:
        assert streamed[k] == pytest.approx(whole[k], rel=1e-6, abs=1e-9), k
    names = [f"c{i}" for i in range(5)]
    assert acc.per_class(names) == pytest.approx(M.per_class_accuracy(logits[-1], labels, names))
    assert whole["acc"] == pytest.approx(M.accuracy(logits[-1], labels))
    assert whole["kl_step3"] == pytest.approx(M.kl_drift(logits[0], logits[3]), rel=1e-6)


def test_bf16_logits_are_accepted():
    logits = _logits_from_probs(P).bfloat16()
    assert M.accuracy(logits, LABELS) == pytest.approx(50.0)
    assert isinstance(M.brier_score(logits, LABELS), float)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="labels must lie in"):
        M.accuracy(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels must be"):
        M.accuracy(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="no samples"):
        M.StepMetricAccumulator(num_classes=3).compute()
    with pytest.raises(ValueError, match="classnames"):
        M.per_class_accuracy(torch.zeros(2, 3), torch.tensor([0, 1]), ["a", "b"])
