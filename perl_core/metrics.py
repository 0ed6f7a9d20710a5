"""Evaluation metrics for PERL, as pure functions of logits (and embeddings) per reasoning step.

Shapes: `logits` is (N, C) for one step or (S, N, C) for steps 0..K stacked (S = K+1); `labels`
is (N,) with values in [0, C). Functions that take per-step logits broadcast the labels over S.
Everything is computed in float32 whatever the input dtype (bf16 evaluation rounds otherwise).

Units, chosen to match the paper's tables and figures (and `pipeline.aggregate`):
- accuracy, confidence, harmonic mean: percent (0..100);
- Brier score: multi-class, sum over classes of the squared error, mean over samples (0..2);
- KL drift: nats, mean over samples;
- anchor cosine: mean cos(v0, vK) over samples (-1..1).

KL direction. The paper measures prediction drift as "the KL divergence from the step-0
distribution" (Fig. 5). We read "divergence from Q" in the information-theoretic sense
(D_KL(P || Q) is "the divergence of P from Q"), with the zero-shot prediction as the reference:

    kl_step{k} = mean_i KL(p_k(i) || p_0(i)) = mean_i sum_c p_k,c (log p_k,c - log p_0,c)

i.e. the information gained by moving from the zero-shot distribution to the step-k one.
kl_step0 is 0 by construction.

Streaming: evaluation sees the test set batch by batch, and keeping (K+1, N, C) logits for a
1000-class, 50k-image test set would take gigabytes, so `StepMetricAccumulator` keeps sums, plus
two scalars per sample and step (the KL and the hit, 5 bytes: 1 MB for 50k images and K = 4) for
the drift-group quantiles of Fig. 5.

Alignment (the review's question: does the recurrence keep CLIP's image-text alignment?), per
step k with image embeddings v_k and the class text embeddings t_k of the same step (those the
step-k logits use), all L2-normalised (^):
- cos_true_step{k} = mean_i cos(v_k(i), t_k(y_i)) (the step-k true logit / logit_scale);
- cos_wrong_step{k} = mean_i max_{c != y_i} cos(v_k(i), t_k(c)) (the nearest wrong class);
- margin_step{k} = mean_i [cos_true(i) - cos_wrong(i)] (> 0 where the sample is correct);
- gap_step{k} = || mean_i v^_k(i) - mean_c t^_k(c) ||_2, the modality gap of Liang et al. (2022):
  the distance between the centroid of the normalised image embeddings of the evaluation set and
  that of its normalised class text embeddings (one per class name, each class weighted once).

Drift groups (Fig. 5), per step k >= 1, by correctness at step 0 -> step k: `stay_correct`,
`wrong_to_correct`, `correct_to_wrong`, `stay_wrong`; for each, the sample count
n_{group}_step{k} and the quartiles of the per-sample KL(p_k || p_0),
kl_{group}_q{25,50,75}_step{k} (linear interpolation, numpy's default; absent when the group is
empty).

Input Jacobian (Figs. 4/7): jacobian_step{k} is the mean over a seeded subsample of the L2 norm of
d logit_k(y) / d x, x the normalised pixels; computed by `perl_core.evaluate.jacobian_norms` and
handed in through `StepMetricAccumulator.add_jacobian`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

# --- per-sample quantities (..., N) --------------------------------------------------------------


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.ndim not in (2, 3):
        raise ValueError(f"logits must be (N, C) or (steps, N, C); got {tuple(logits.shape)}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[-2]:
        raise ValueError(f"labels must be (N,) with N={logits.shape[-2]}; got "
                         f"{tuple(labels.shape)}")


def _label_range_error(lo: int, hi: int, num_classes: int) -> ValueError | None:
    if lo < 0 or hi >= num_classes:
        return ValueError(f"labels must lie in [0, {num_classes}); got range [{lo}, {hi}]")
    return None


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    _check_shapes(logits, labels)
    if labels.numel():
        err = _label_range_error(int(labels.min()), int(labels.max()), logits.shape[-1])
        if err is not None:
            raise err


def _gather_true(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """x (..., N, C) -> x[..., i, labels[i]] (..., N)."""
    idx = labels.view(*([1] * (x.ndim - 2)), -1, 1).expand(*x.shape[:-1], 1)
    return x.gather(-1, idx).squeeze(-1)


# The `_unchecked` forms skip the label-range check, which reads the labels on the host (a
# device sync per call): the accumulator checks once per batch without one (`update`).
def _correct_unchecked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1) == labels


def _true_prob_unchecked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _gather_true(logits.float().softmax(dim=-1), labels)


def _brier_unchecked(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    p = logits.float().softmax(dim=-1)
    return (p * p).sum(dim=-1) - 2.0 * _gather_true(p, labels) + 1.0


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(..., N) bool: top-1 prediction equals the label."""
    _check(logits, labels)
    return _correct_unchecked(logits, labels)


def true_class_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(..., N): softmax probability of the true class."""
    _check(logits, labels)
    return _true_prob_unchecked(logits, labels)


def brier(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(..., N): sum_c (p_c - onehot_c)^2 = sum_c p_c^2 - 2 p_y + 1."""
    _check(logits, labels)
    return _brier_unchecked(logits, labels)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """(..., N): KL(p || q) = sum_c p_c (log p_c - log q_c), from logits (log-softmax: stable)."""
    if logits_p.shape[-1] != logits_q.shape[-1]:
        raise ValueError(f"class counts differ: {logits_p.shape[-1]} vs {logits_q.shape[-1]}")
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    # Clamp: tiny negative values are rounding error (KL >= 0).
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,): cos(a_i, b_i) for embeddings (N, D)."""
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def class_cosines(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cos to the true class, cos to the nearest wrong class), each (..., N), for image
    embeddings (..., N, D) and class text embeddings (..., C, D) (normalised here). The second is
    None with a single class (no wrong class exists)."""
    return _class_cosines(image, text, labels, check=True)


def _class_cosines(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, *,
                   check: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    if image.shape[:-2] != text.shape[:-2] or image.shape[-1] != text.shape[-1]:
        raise ValueError(f"image embeddings {tuple(image.shape)} and text embeddings "
                         f"{tuple(text.shape)} do not pair up as (..., N, D) / (..., C, D)")
    cos = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(-1, -2)
    (_check if check else _check_shapes)(cos, labels)
    true = _gather_true(cos, labels)
    if cos.shape[-1] < 2:
        return true, None
    # mask the true class out with -inf, then the max is the nearest wrong class
    idx = labels.view(*([1] * (cos.ndim - 2)), -1, 1).expand(*cos.shape[:-1], 1)
    wrong = cos.scatter(-1, idx, float("-inf")).amax(dim=-1)
    return true, wrong


def modality_gap(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(...,): || mean_i v^(i) - mean_c t^(c) ||_2 for (..., N, D) images, (..., C, D) texts."""
    v = F.normalize(image.float(), dim=-1).mean(dim=-2)
    t = F.normalize(text.float(), dim=-1).mean(dim=-2)
    return (v - t).norm(dim=-1)


from perl_core.metric_names import DRIFT_GROUPS, DRIFT_QUANTILES  # noqa: E402


def drift_group_stats(kl_steps: torch.Tensor, hits_steps: torch.Tensor) -> dict[str, float]:
    """Fig. 5's split of the per-sample KL(p_k || p_0) (S, N) by the hits (S, N) at step 0 and
    step k: n_{group}_step{k} and kl_{group}_q{25,50,75}_step{k} for k = 1..S-1 (quantiles only
    for non-empty groups)."""
    if kl_steps.shape != hits_steps.shape or kl_steps.ndim != 2:
        raise ValueError(f"kl {tuple(kl_steps.shape)} and hits {tuple(hits_steps.shape)} must "
                         f"both be (steps, N)")
    hits = hits_steps.bool()
    q = torch.tensor([p / 100.0 for p in DRIFT_QUANTILES], dtype=torch.float64)
    out: dict[str, float] = {}
    for k in range(1, kl_steps.shape[0]):
        c0, ck = hits[0], hits[k]
        masks = {"stay_correct": c0 & ck, "wrong_to_correct": ~c0 & ck,
                 "correct_to_wrong": c0 & ~ck, "stay_wrong": ~c0 & ~ck}
        for g in DRIFT_GROUPS:
            vals = kl_steps[k][masks[g]].double()
            out[f"n_{g}_step{k}"] = float(vals.numel())
            if vals.numel():
                for p, v in zip(DRIFT_QUANTILES, torch.quantile(vals, q).tolist()):
                    out[f"kl_{g}_q{p}_step{k}"] = v
    return out


# --- aggregates (floats) ---------------------------------------------------------------------


def _mean(x: torch.Tensor) -> float:
    if x.numel() == 0:
        raise ValueError("no samples to average over")
    return float(x.float().mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent (one step: logits (N, C))."""
    return 100.0 * _mean(correct(logits, labels))


def mean_confidence(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean softmax probability of the true class, in percent."""
    return 100.0 * _mean(true_class_prob(logits, labels))


def brier_score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Multi-class Brier score: mean over samples of sum_c (p_c - onehot_c)^2, in [0, 2]."""
    return _mean(brier(logits, labels))


def kl_drift(logits_step0: torch.Tensor, logits_stepk: torch.Tensor) -> float:
    """Mean over samples of KL(p_k || p_0) in nats (see the module docstring for the direction)."""
    return _mean(kl_divergence(logits_stepk, logits_step0))


def anchor_cosine(v0: torch.Tensor, vk: torch.Tensor) -> float:
    """Mean cos(v0_i, vK_i) between zero-shot and refined image embeddings (N, D)."""
    return _mean(cosine(v0, vk))


def harmonic_mean(a: float, b: float) -> float:
    """HM = 2ab / (a + b); 0 when both are 0 (CoOp convention); NaN propagates."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if a < 0 or b < 0:
        raise ValueError(f"harmonic mean of negative values {a}, {b}")
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def per_step_accuracy(logits_steps: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """[acc at step 0, ..., acc at step K] in percent, for logits (K+1, N, C)."""
    if logits_steps.ndim != 3:
        raise ValueError(f"logits_steps must be (steps, N, C); got {tuple(logits_steps.shape)}")
    return [100.0 * v for v in correct(logits_steps, labels).float().mean(dim=-1).tolist()]


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor,
                       classnames: Sequence[str]) -> dict[str, float]:
    """{classname: accuracy in percent} over the classes that have test samples (one step)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C) for one step; got {tuple(logits.shape)}")
    if len(classnames) != logits.shape[-1]:
        raise ValueError(f"{len(classnames)} classnames for {logits.shape[-1]} logit columns")
    hits = correct(logits, labels).float()
    n = torch.bincount(labels, minlength=len(classnames))
    k = torch.bincount(labels, weights=hits, minlength=len(classnames))
    return {name: 100.0 * float(k[c]) / int(n[c]) for c, name in enumerate(classnames) if n[c] > 0}


def step_metrics(logits_steps: torch.Tensor, labels: torch.Tensor, v0: torch.Tensor | None = None,
                 vk: torch.Tensor | None = None, *, image_steps: torch.Tensor | None = None,
                 text_steps: torch.Tensor | None = None) -> dict[str, float]:
    """All per-step metrics of one evaluation set, unprefixed (see `StepMetricAccumulator`)."""
    acc = StepMetricAccumulator(num_classes=logits_steps.shape[-1])
    acc.update(logits_steps, labels, v0, vk, image_steps=image_steps, text_steps=text_steps)
    return acc.compute()


# --- streaming accumulator -----------------------------------------------------------------------


@dataclass
class StepMetricAccumulator:
    """Sums per-step metrics over batches; `compute()` gives the contract's metric names.

    Keys: acc (final step), acc_step{k}, confidence_step{k}, brier_step{k}, kl_step{k} for
    k = 0..K, anchor_cos (when image embeddings were given), n (sample count); the drift groups
    (`drift_group_stats`); with image_steps and text_steps: cos_true_step{k}, cos_wrong_step{k},
    margin_step{k}, gap_step{k}; after `add_jacobian`: jacobian_step{k} (module docstring).
    """

    num_classes: int
    n: int = 0
    _correct: torch.Tensor | None = None  # (S,) sums
    _conf: torch.Tensor | None = None
    _brier: torch.Tensor | None = None
    _kl: torch.Tensor | None = None
    _cos_sum: torch.Tensor | float = 0.0
    _cos_n: int = 0
    # labels outside [0, C) seen on the device (checked in compute(): reading them per batch
    # would sync)
    _bad_labels: torch.Tensor | None = None
    # per-sample KL and hits (S, n) per batch, for the drift-group quantiles (Fig. 5)
    _kl_parts: list = field(default_factory=list)
    _hit_parts: list = field(default_factory=list)
    # alignment sums (S,) and the image-embedding centroid sum (S, D); the text centroid (S, D)
    # is the same for every batch of one evaluation set, taken from the first
    _align: dict = field(default_factory=dict)
    _image_sum: torch.Tensor | None = None
    _text_mean: torch.Tensor | None = None
    _align_n: int = 0
    _jac: list = field(default_factory=list)  # per-sample input-gradient norms (S, m) per batch
    # final-step per-class hit counts, for per-class accuracy
    _class_hits: torch.Tensor | None = None
    _class_n: torch.Tensor | None = None

    def update(self, logits_steps: torch.Tensor, labels: torch.Tensor,
               v0: torch.Tensor | None = None, vk: torch.Tensor | None = None, *,
               image_steps: torch.Tensor | None = None,
               text_steps: torch.Tensor | None = None) -> None:
        """logits (K+1, N, C) (or (N, C) = one step), labels (N,), optional v0/vK (N, D);
        image_steps (K+1, N, D) with text_steps (K+1, C, D): the alignment metrics too (and v0 /
        vK default to image_steps' first and last step).

        Everything stays on the logits' device (no host sync, no per-batch copy of the
        (K+1, N, C) logits); `compute()` copies the sums and per-sample values once. Labels on
        the CPU (both evaluation paths) are range-checked here from their host memory; labels
        already on an accelerator are checked in `compute()`.
        """
        if image_steps is not None:
            v0 = image_steps[0] if v0 is None else v0
            vk = image_steps[-1] if vk is None else vk
        if logits_steps.ndim == 2:
            logits_steps = logits_steps.unsqueeze(0)
        _check_shapes(logits_steps, labels)
        if logits_steps.shape[-1] != self.num_classes:
            raise ValueError(f"logits have {logits_steps.shape[-1]} classes, expected "
                             f"{self.num_classes}")
        logits_steps = logits_steps.detach().float()
        device = logits_steps.device
        labels = self._checked_labels(labels.detach(), device)
        hits = _correct_unchecked(logits_steps, labels).double()
        kl = kl_divergence(logits_steps, logits_steps[:1])
        parts = {
            "_correct": hits.sum(dim=-1),
            "_conf": _true_prob_unchecked(logits_steps, labels).double().sum(dim=-1),
            "_brier": _brier_unchecked(logits_steps, labels).double().sum(dim=-1),
            "_kl": kl.double().sum(dim=-1),
        }
        for name, value in parts.items():
            prev = getattr(self, name)
            if prev is not None and prev.shape != value.shape:
                raise ValueError(f"step count changed between batches: {prev.shape[0]} vs "
                                 f"{value.shape[0]}")
            setattr(self, name, value if prev is None else prev + value)
        self.n += labels.shape[0]
        self._kl_parts.append(kl)
        self._hit_parts.append(hits.bool())
        if image_steps is not None and text_steps is not None:
            self._update_alignment(image_steps, text_steps, labels)
        if self._class_hits is None or self._class_n is None:
            self._class_hits = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
            self._class_n = torch.zeros(self.num_classes, dtype=torch.float64, device=device)
        self._class_hits.index_add_(0, labels, hits[-1])
        self._class_n.index_add_(0, labels, torch.ones_like(hits[-1]))
        if v0 is not None and vk is not None:
            cos = cosine(v0.detach().to(device), vk.detach().to(device)).double()
            self._cos_sum = self._cos_sum + cos.sum()
            self._cos_n += cos.shape[0]

    def _checked_labels(self, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`labels` on `device`, range-checked without a device sync."""
        if labels.numel() and labels.device.type == "cpu":
            # host memory: numpy reads it without a torch op (no aten::item)
            host = labels.numpy()
            err = _label_range_error(int(host.min()), int(host.max()), self.num_classes)
            if err is not None:
                raise err
            return labels.to(device, non_blocking=True)
        if labels.numel():  # on an accelerator: flag now, raise in compute()
            bad = ((labels < 0) | (labels >= self.num_classes)).any()
            self._bad_labels = bad if self._bad_labels is None else self._bad_labels | bad
            labels = labels.clamp(0, self.num_classes - 1)  # no device-side assert meanwhile
        return labels.to(device)

    def _update_alignment(self, image: torch.Tensor, text: torch.Tensor,
                          labels: torch.Tensor) -> None:
        if image.ndim != 3 or text.ndim != 3 or image.shape[0] != self._correct.shape[0]:
            raise ValueError(f"image_steps {tuple(image.shape)} / text_steps {tuple(text.shape)}"
                             f" must be (steps, N, D) / (steps, C, D) with the logits' "
                             f"{self._correct.shape[0]} steps")
        device = self._correct.device
        image, text = image.detach().float().to(device), text.detach().float().to(device)
        true, wrong = _class_cosines(image, text, labels, check=False)
        sums = {"cos_true": true.double().sum(dim=-1)}
        if wrong is not None:
            sums["cos_wrong"] = wrong.double().sum(dim=-1)
            sums["margin"] = (true - wrong).double().sum(dim=-1)
        for name, v in sums.items():
            self._align[name] = v if name not in self._align else self._align[name] + v
        img = F.normalize(image, dim=-1).double().sum(dim=-2)
        self._image_sum = img if self._image_sum is None else self._image_sum + img
        if self._text_mean is None:
            self._text_mean = F.normalize(text, dim=-1).double().mean(dim=-2)
        self._align_n += labels.shape[0]

    def add_jacobian(self, norms: torch.Tensor) -> None:
        """Per-sample input-gradient norms (S, m) of a subsample (`evaluate.jacobian_norms`)."""
        if norms.ndim != 2 or (self._correct is not None and norms.shape[0] !=
                               self._correct.shape[0]):
            raise ValueError(f"jacobian norms must be (steps, m) with the logits' steps; got "
                             f"{tuple(norms.shape)}")
        self._jac.append(norms.detach().double())  # copied with the rest in compute()

    def compute(self) -> dict[str, float]:
        if self.n == 0 or self._correct is None:
            raise ValueError("no samples were accumulated")
        if self._bad_labels is not None and bool(self._bad_labels):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); some batch had "
                             f"labels outside it")
        self._to_host()
        out: dict[str, float] = {}
        steps = self._correct.shape[0]
        out["acc"] = 100.0 * float(self._correct[-1]) / self.n
        for name, scale, sums in (("acc", 100.0, self._correct), ("confidence", 100.0, self._conf),
                                  ("brier", 1.0, self._brier), ("kl", 1.0, self._kl)):
            assert sums is not None
            for k in range(steps):
                out[f"{name}_step{k}"] = scale * float(sums[k]) / self.n
        if self._cos_n:
            out["anchor_cos"] = float(self._cos_sum) / self._cos_n
        for name, sums in self._align.items():
            for k in range(steps):
                out[f"{name}_step{k}"] = float(sums[k]) / self._align_n
        if self._image_sum is not None and self._text_mean is not None:
            gap = (self._image_sum / self._align_n - self._text_mean).norm(dim=-1)
            out.update({f"gap_step{k}": float(gap[k]) for k in range(steps)})
        if self._jac:
            jac = torch.cat(self._jac, dim=1).mean(dim=1)
            out.update({f"jacobian_step{k}": float(jac[k]) for k in range(jac.shape[0])})
        out.update(drift_group_stats(torch.cat(self._kl_parts, dim=1),
                                     torch.cat(self._hit_parts, dim=1)))
        out["n"] = float(self.n)
        return out

    def _to_host(self) -> None:
        """Copy the accumulated state to the CPU, once (the per-batch updates never sync)."""
        def host(x: Any) -> Any:
            return x.cpu() if isinstance(x, torch.Tensor) else x

        for name in ("_correct", "_conf", "_brier", "_kl", "_cos_sum", "_image_sum",
                     "_text_mean", "_class_hits", "_class_n"):
            setattr(self, name, host(getattr(self, name)))
        self._align = {k: host(v) for k, v in self._align.items()}
        for name in ("_kl_parts", "_hit_parts", "_jac"):
            parts = getattr(self, name)
            if parts and parts[0].device.type != "cpu":  # one copy of the whole set
                setattr(self, name, [torch.cat(parts, dim=1).cpu()])

    def per_class(self, classnames: Sequence[str]) -> dict[str, float]:
        """{classname: final-step accuracy in percent} for the classes that had samples."""
        if len(classnames) != self.num_classes:
            raise ValueError(f"{len(classnames)} classnames for {self.num_classes} classes")
        if self._class_hits is None or self._class_n is None:
            return {}
        self._to_host()
        return {name: 100.0 * float(self._class_hits[c] / self._class_n[c])
                for c, name in enumerate(classnames) if self._class_n[c] > 0}


__all__ = ["correct", "true_class_prob", "brier", "kl_divergence", "cosine", "class_cosines",
           "modality_gap", "drift_group_stats", "DRIFT_GROUPS", "DRIFT_QUANTILES", "accuracy",
           "mean_confidence", "brier_score", "kl_drift", "anchor_cosine", "harmonic_mean",
           "per_step_accuracy", "per_class_accuracy", "step_metrics", "StepMetricAccumulator"]
