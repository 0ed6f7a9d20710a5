"""Issue 14 parts 2 and 4, each metric against an independent computation: the alignment cosines
and modality gap (numpy), the Fig. 5 drift groups (a per-sample loop), the input Jacobian (central
finite differences through the no-grad model path, float64), and both evaluation paths giving the
same new metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perl_core import metrics as M
from perl_core.evaluate import jacobian_norms, jacobian_subsample

S, N, C, D = 3, 11, 4, 5


def _np_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _accumulate(logits, labels, image=None, text=None, splits=(4, 9)):
    """The accumulator fed in uneven batches (streaming must not change the result)."""
    acc = M.StepMetricAccumulator(num_classes=logits.shape[-1])
    edges = (0, *splits, logits.shape[1])
    for a, b in zip(edges[:-1], edges[1:]):
        acc.update(logits[:, a:b], labels[a:b],
                   image_steps=None if image is None else image[:, a:b], text_steps=text)
    return acc.compute()


def test_alignment_cosines_margin_and_gap_against_numpy():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(S, N, D, generator=g) * 3  # unnormalised on purpose
    text = torch.randn(S, C, D, generator=g)
    labels = torch.randint(0, C, (N,), generator=g)
    logits = 100 * torch.nn.functional.normalize(image, dim=-1) @ \
        torch.nn.functional.normalize(text, dim=-1).transpose(-1, -2)
    out = _accumulate(logits, labels, image, text)
    v, t, y = _np_normalise(image.double().numpy()), _np_normalise(text.double().numpy()), \
        labels.numpy()
    for k in range(S):
        cos = v[k] @ t[k].T  # (N, C)
        true = cos[np.arange(N), y]
        wrong = np.array([max(cos[i, c] for c in range(C) if c != y[i]) for i in range(N)])
        assert out[f"cos_true_step{k}"] == pytest.approx(true.mean(), abs=1e-6)
        assert out[f"cos_wrong_step{k}"] == pytest.approx(wrong.mean(), abs=1e-6)
        assert out[f"margin_step{k}"] == pytest.approx((true - wrong).mean(), abs=1e-6)
        gap = np.linalg.norm(v[k].mean(axis=0) - t[k].mean(axis=0))
        assert out[f"gap_step{k}"] == pytest.approx(gap, abs=1e-6)
    # the old keys are unchanged, and v0 / vK default to the first and last step
    assert out["anchor_cos"] == pytest.approx(float((v[0] * v[-1]).sum(-1).mean()), abs=1e-6)


def test_single_class_has_no_wrong_class_cosine():
    image, text = torch.randn(2, 3, D), torch.randn(2, 1, D)
    out = _accumulate(torch.zeros(2, 3, 1), torch.zeros(3, dtype=torch.long), image, text,
                      splits=(1,))
    assert "cos_true_step0" in out and "cos_wrong_step0" not in out and "margin_step1" not in out


def test_drift_groups_against_a_per_sample_loop():
    g = torch.Generator().manual_seed(3)
    n = 40
    logits = torch.randn(S, n, C, generator=g) * 2
    labels = torch.randint(0, C, (n,), generator=g)
    out = _accumulate(logits, labels, splits=(7, 30))
    p = torch.softmax(logits.double(), dim=-1).numpy()
    y = labels.numpy()
    seen_groups = set()
    for k in range(1, S):
        groups: dict[str, list[float]] = {g: [] for g in M.DRIFT_GROUPS}
        for i in range(n):
            kl = float(np.sum(p[k, i] * (np.log(p[k, i]) - np.log(p[0, i]))))
            c0, ck = p[0, i].argmax() == y[i], p[k, i].argmax() == y[i]
            name = {(True, True): "stay_correct", (False, True): "wrong_to_correct",
                    (True, False): "correct_to_wrong", (False, False): "stay_wrong"}[(c0, ck)]
            groups[name].append(kl)
        for name, vals in groups.items():
            assert out[f"n_{name}_step{k}"] == len(vals)
            for q in (25, 50, 75):
                key = f"kl_{name}_q{q}_step{k}"
                if vals:
                    seen_groups.add(name)
                    assert out[key] == pytest.approx(np.percentile(vals, q), abs=1e-5), key
                else:
                    assert key not in out
        assert sum(out[f"n_{g}_step{k}"] for g in M.DRIFT_GROUPS) == n
    assert len(seen_groups) == 4  # the draw exercises every group
    assert not any(k.endswith("_step0") and k.startswith(("n_", "kl_stay", "kl_wrong",
                                                          "kl_correct")) for k in out)


def test_jacobian_subsample_is_fixed_and_seed_independent():
    a = jacobian_subsample(100, 8)
    assert a == jacobian_subsample(100, 8) and len(set(a)) == 8 and a == sorted(a)
    assert jacobian_subsample(5, 8) == list(range(5)) and jacobian_subsample(100, 0) == []


@pytest.fixture
def jac_model(tiny_clip_cfg):
    from perl_core import build_perl

    tiny_clip_cfg["vision_cfg"]["image_size"] = 16  # 768 input values: a fast full FD gradient
    torch.manual_seed(0)
    model = build_perl(model_cfg=tiny_clip_cfg, inject_layer=2, num_steps=2).double().eval()
    torch.manual_seed(5)
    with torch.no_grad():  # steps must differ from step 0 for the check to mean anything
        for p in model.projectors.parameters():
            p.normal_(0, 0.5)
    return model


def test_jacobian_norms_against_central_finite_differences(jac_model, one_thread):
    """The full gradient of each step's true logit w.r.t. every input value, by central
    differences through `encode_image(steps=k)` (the no-grad path: independent of the
    differentiable one), in float64; its L2 norm per sample must match."""
    model = jac_model
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    tokens = model.tokenize(["a red circle", "a blue square", "a green blob"])
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        text = model.encode_text_all_steps(tokens)  # (K+1, C, D)
    got = jacobian_norms(model, images, labels, text)
    K = model.num_steps
    assert got.shape == (K + 1, 2)
    dim, eps = images[0].numel(), 1e-4
    eye = torch.eye(dim, dtype=torch.float64).view(dim, 3, 16, 16) * eps
    t = torch.nn.functional.normalize(text, dim=-1)  # (K+1, C, D)
    for i in range(2):
        def f(x, _y=int(labels[i])):  # (K+1, m): every step's true logit, no-grad path
            with torch.no_grad():
                v = torch.cat([model.encode_image_all_steps(x[j:j + 1024])
                               for j in range(0, x.shape[0], 1024)], dim=1)
                return model.logit_scale * (torch.nn.functional.normalize(v, dim=-1)
                                            * t[:, _y].unsqueeze(1)).sum(-1)
        grad = (f(images[i] + eye) - f(images[i] - eye)) / (2 * eps)  # (K+1, dim)
        for k in range(K + 1):
            assert float(got[k, i]) == pytest.approx(float(grad[k].norm()), rel=1e-5), (i, k)
    assert not torch.allclose(got[0], got[-1])  # the steps really differ


def _toy_eval_config(tmp_path, arch: str, test: int, **kw):
    """A ToyShapes world with `test` images per class and an untrained tiny model's config."""
    from perl_core.config import TrainConfig
    from perl_core.data.synthetic import generate_world

    generate_world(tmp_path / "w", datasets=["ToyShapes"], sizes={"train": 1, "val": 1,
                                                                  "test": test})
    return TrainConfig(dataset="ToyShapes", data_root=str(tmp_path / "w"), arch=arch,
                       pretrained="", inject_layer=2, num_steps=2, shots=1, epochs=0,
                       device="cpu", **kw)


def test_jacobian_in_both_evaluation_paths(tmp_path, tiny_arch, one_thread):
    """evaluate and evaluate_cached report the same jacobian_step{k} (and every other metric),
    measured on cfg.jacobian_samples images; 0 turns it off."""
    from perl_core.cache import FeatureCache
    from perl_core.protocol import resolve_task
    from perl_core.train import build_model, evaluate_task

    cfg = _toy_eval_config(tmp_path, tiny_arch, test=2, eval_batch_size=8, jacobian_samples=3)
    torch.manual_seed(0)
    model = build_model(cfg)
    task = resolve_task(cfg)
    ref, _ = evaluate_task(model, task, cfg)
    got, _ = evaluate_task(model, task, cfg, cache=FeatureCache(str(tmp_path / "c"),
                                                                dtype=torch.float32))
    assert got == ref
    for es in ("base", "novel"):
        for k in range(3):
            for m in ("jacobian", "cos_true", "cos_wrong", "margin", "gap"):
                assert np.isfinite(ref[f"{es}/{m}_step{k}"]), (es, m, k)
        assert ref[f"{es}/jacobian_step0"] > 0
        assert f"{es}/n_stay_correct_step1" in ref
    off, _ = evaluate_task(model, task, cfg.replace(jacobian_samples=0))
    assert not any("jacobian" in k for k in off)
    assert {k: v for k, v in ref.items() if "jacobian" not in k} == off
    # the few-shot val split (HPO's) gets no Jacobian: it would cost more than its evaluation
    from dataclasses import replace

    with_val = replace(task, evalsets=task.evalsets + [replace(task.evalsets[0], name="val")])
    val, _ = evaluate_task(model, with_val, cfg)
    assert "val/acc" in val and "base/jacobian_step0" in val
    assert not any(k.startswith("val/jacobian") for k in val)


def test_evaluate_alignment_drift_and_jacobian_on_a_tiny_model(tmp_path, tiny_arch, one_thread):
    """`evaluate` on a tiny model against numpy over embeddings computed one step at a time
    (`encode_image(steps=k)` / `encode_text(steps=k)`), and the Jacobian against a per-sample
    autograd loop over its seeded subsample."""
    from perl_core.data.templates import class_prompts
    from perl_core.evaluate import decode_images, evaluate
    from perl_core.protocol import resolve_task
    from perl_core.train import build_model

    cfg = _toy_eval_config(tmp_path, tiny_arch, test=3, eval_batch_size=7, jacobian_samples=5)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # steps must differ from step 0
        for p in model.projectors.parameters():
            p.normal_(0, 0.5)
    es = resolve_task(cfg).evalsets[0]
    out = evaluate(model, es.items, es.classnames, es.dataset, cfg)
    x = decode_images(es.items, model.image_size)
    y = np.array([d.label for d in es.items])
    tokens = model.tokenize(class_prompts(list(es.classnames), es.dataset, cfg.template))
    p0 = None
    with torch.no_grad():
        for k in range(3):
            v = _np_normalise(model.encode_image(x, steps=k).double().numpy())
            t = _np_normalise(model.encode_text(tokens, steps=k).double().numpy())
            cos = v @ t.T
            true = cos[np.arange(len(y)), y]
            wrong = np.where(np.eye(cos.shape[1], dtype=bool)[y], -np.inf, cos).max(axis=1)
            assert out[f"cos_true_step{k}"] == pytest.approx(true.mean(), abs=1e-5)
            assert out[f"margin_step{k}"] == pytest.approx((true - wrong).mean(), abs=1e-5)
            assert out[f"gap_step{k}"] == pytest.approx(
                np.linalg.norm(v.mean(0) - t.mean(0)), abs=1e-5)
            logits = float(model.logit_scale) * cos
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            if k == 0:
                p0, hit0 = p, p.argmax(1) == y
                continue
            kl = (p * (np.log(p) - np.log(p0))).sum(1)
            stay = hit0 & (p.argmax(1) == y)
            assert out[f"n_stay_correct_step{k}"] == stay.sum()
            if stay.any():
                assert out[f"kl_stay_correct_q50_step{k}"] == pytest.approx(
                    np.median(kl[stay]), abs=1e-4)
            # the Jacobian: one sample at a time through autograd, mean over the subsample
            norms = []
            for i in jacobian_subsample(len(es.items), 5):
                with torch.enable_grad():
                    xi = x[i:i + 1].clone().requires_grad_(True)
                    vi = torch.nn.functional.normalize(model.encode_image_all_steps_differentiable(
                        xi)[k], dim=-1)
                    logit = model.logit_scale * (vi[0] * torch.from_numpy(t[y[i]]).float()).sum()
                    (g,) = torch.autograd.grad(logit, xi)
                norms.append(float(g.norm()))
            assert out[f"jacobian_step{k}"] == pytest.approx(np.mean(norms), rel=1e-4)
