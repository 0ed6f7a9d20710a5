"""`pipeline.run --dry-run --bench BENCH.json` and `pipeline.status --bench`: the GPU-time estimate
of a sweep from made-up bench figures (known numbers give the exact expected seconds), the
workload from the data or from the CoOp size table, FLOPs scaling for another K / arch, and clear
errors naming the bench file and key. No trial runs; no MLflow store is created.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from perl_core.config import TrainConfig
from pipeline import estimate as E

REAL_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "coop_real" / "splits"

BENCH = {
    "device": "cuda", "arch": "perl-tiny", "precision": "fp32", "pretrained": "embedded",
    "perl_eval_img_per_s_uncached": 100.0, "perl_eval_img_per_s_cached": 400.0,
    "train_step_s_by_classes": {"10": {"cached": 0.5, "uncached": 1.0, "speedup": 2.0},
                                "100": {"cached": 1.5, "uncached": 3.0, "speedup": 2.0},
                                "1000": {"cached": 4.0, "uncached": 8.0, "speedup": 2.0}},
    "trial_overhead_s": 2.0,
}


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory) -> Path:
    from perl_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("world")
    generate_world(root, datasets=["ToyShapes"], sizes={"train": 4, "val": 2, "test": 3})
    return root


def bench_file(tmp_path: Path, **changes) -> Path:
    data = json.loads(json.dumps(BENCH))
    data.update(changes)
    p = tmp_path / "bench.json"
    p.write_text(json.dumps(data))
    return p


def sweep(tmp_path: Path, world: Path | str, grid: str = "  seed: [1, 2]\n",
          fixed: str = "") -> Path:
    p = tmp_path / "est.yaml"
    p.write_text(f"""\
name: est
experiment: test/est
fixed:
  arch: perl-tiny
  pretrained: embedded
  data_root: {world}
  dataset: ToyShapes
  shots: 2
  epochs: 1
  num_steps: 4
  inject_layer: 7
{fixed}grid:
{grid}storage: {tmp_path / 'runs'}
tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}
""")
    return p


def dry_run(args: list[str], capsys) -> tuple[int, str]:
    from pipeline.run import main

    rc = main(args)
    return rc, capsys.readouterr().out


# --- the exact estimate ---------------------------------------------------------------------------


def test_known_bench_figures_give_the_exact_estimate(tmp_path, shapes_world, capsys):
    # the workload, counted here straight from the split file (CoOp protocol: base = the first
    # ceil(n/2) labels, `shots` train and min(shots, 4) val images per base class, all test images)
    split = json.loads((shapes_world / "toy_shapes" / "split_zhou_ToyShapes.json").read_text())
    n = len({y for _, y, _ in split["train"]})
    base = math.ceil(n / 2)
    steps = 2 * base // 4
    images = len(split["test"]) + 2 * base
    assert (base, steps, images) == (10, 5, 80)  # the world this test was written for

    y = sweep(tmp_path, shapes_world)
    rc, out = dry_run([str(y), "--dry-run", "--bench", str(bench_file(tmp_path))], capsys)
    assert rc == 0, out
    # seed 1: 5 steps x 1.0 s (10 classes, uncached) + 80 images / 100 img/s + 2 s overhead = 7.8
    # seed 2: same training cost (other views), eval from the feature cache: 80 / 400 + 2 = 7.2
    total = 5 * 1.0 + 80 / 100 + 2 + 5 * 1.0 + 80 / 400 + 2
    assert total == pytest.approx(15.0)
    assert "workload of 2 cell(s) to run: 10 training steps, 160 images evaluated" in out, out
    assert "sizes from: data" in out
    assert f"estimated GPU time: {total / 3600:.3g} GPU-h (15 s: train 10 s, eval 1 s, " \
           "overhead 4 s)" in out, out
    assert "device cuda, arch perl-tiny, fp32, bench J=7 K=4" in out
    assert "trial_overhead_s" in out and "warning" not in out
    assert not (tmp_path / "mlflow.db").exists()

    cells = [(f"c{s}", TrainConfig(arch="perl-tiny", pretrained="embedded", dataset="ToyShapes",
                                   data_root=str(shapes_world), shots=2, seed=s))
             for s in (1, 2)]
    bench = E.load_bench(str(bench_file(tmp_path)))
    est = E.estimate(cells, bench)
    assert [(c.train_s, c.eval_s, c.overhead_s) for c in est.cells] == \
        [pytest.approx((5.0, 0.8, 2.0)), pytest.approx((5.0, 0.2, 2.0))]
    assert [(c.eval_cached, c.train_cached) for c in est.cells] == [(False, False), (True, False)]
    # the same cell twice: its training views hit too (cached step 0.5 s)
    est = E.estimate([cells[0], cells[0]], bench)
    assert est.cells[1].train_s == pytest.approx(2.5) and est.cells[1].train_cached
    # feature cache off: every cell pays the uncached figures; explicit overhead wins
    est = E.estimate(cells, bench, cache_enabled=False, overhead_s=0.5, overhead_from="flag")
    assert est.seconds == pytest.approx(2 * (5.0 + 0.8 + 0.5))

    # pipeline.status --bench: the same estimator over the cells not done (none are)
    from pipeline.status import main as status

    assert status([str(y), "--bench", str(bench_file(tmp_path))]) == 0
    assert f"{total / 3600:.3g} GPU-h (15 s; device cuda, arch perl-tiny" in \
        capsys.readouterr().out.replace("\n", " ")


def test_table_sizes_protocols_and_log_class_interpolation(tmp_path):
    bench = E.load_bench(str(bench_file(tmp_path, arch="ViT-B-16-quickgelu")))
    absent = str(tmp_path / "no-data-here")
    b2n = TrainConfig(dataset="Caltech101", data_root=absent)  # paper defaults: 16 shots, K=4
    w = E.cell_workload(b2n)
    # 100 classes -> 50 base; 16 x 50 / 4 steps; 2,465 test + 4 x 50 few-shot val images
    assert (w.train_classes, w.steps, w.eval_images, w.source) == (50, 200, 2665, "table")
    est = E.estimate([("c", b2n)], bench, overhead_s=0.0)
    step50 = 1.0 + (math.log(50) - math.log(10)) / (math.log(100) - math.log(10)) * (3.0 - 1.0)
    assert est.cells[0].train_s == pytest.approx(200 * step50)
    assert est.cells[0].eval_s == pytest.approx(2665 / 100)
    # clamped outside the measured class counts; batch 8 costs twice a batch-4 step
    assert bench.step_s(5, cached=False) == 1.0 and bench.step_s(5000, cached=True) == 4.0
    eight = E.estimate([("c", b2n.replace(batch_size=8))], bench, overhead_s=0.0)
    assert eight.cells[0].train_s == pytest.approx(100 * step50 * 2)

    xd = TrainConfig(dataset="ImageNet", protocol="cross_dataset", data_root=absent,
                     eval_datasets=("Caltech101", "DTD"))
    w = E.cell_workload(xd)  # all 1000 classes; ImageNet evaluates no val (val = test)
    assert (w.train_classes, w.steps, w.eval_images) == (1000, 4000, 50_000 + 2_465 + 1_692)
    dg = TrainConfig(dataset="ImageNet", protocol="domain_generalization", data_root=absent)
    assert E.cell_workload(dg).eval_images == 50_000 + 10_000 + 50_889 + 7_500 + 30_000
    est = E.estimate([("x", xd)], bench, overhead_s=0.0)
    assert est.cells[0].train_s == pytest.approx(4000 * 8.0)

    with pytest.raises(E.EstimateError, match="'ToyShapes' has no split file under data_root "
                                              "and is not a CoOp benchmark of known size"):
        E.cell_workload(TrainConfig(dataset="ToyShapes", data_root=absent))
    # in an estimate, such a cell is named and left out of the totals (never guessed)
    est = E.estimate([("t", TrainConfig(dataset="ToyShapes", data_root=absent)), ("c", b2n)],
                     bench, overhead_s=0.0)
    assert [c.name for c in est.cells] == ["c"] and [n for n, _ in est.unknown] == ["t"]
    lines: list[str] = []
    E.report(est, lines.append)
    text = "\n".join(lines)
    assert "1 cell(s) not counted, sizes unknown: dataset 'ToyShapes'" in text
    assert "estimated GPU time for 1 of 2 cells" in text


def test_other_k_or_arch_is_scaled_by_the_analytic_flops_and_warned(tmp_path, shapes_world):
    from perl_core.bench import vision_flops
    from perl_core.factory import create_clip
    from perl_core.model import PerlModel

    bench = E.load_bench(str(bench_file(tmp_path)))
    model = PerlModel(create_clip("perl-tiny", None), inject_layer=7, num_steps=4)
    f = {k: vision_flops(model, steps=k)[1] for k in (0, 2, 4)}
    assert E.flops("perl-tiny", 7, 4) == pytest.approx((f[4], f[4] - f[0]))  # the real model's
    full, thought = f[2] / f[4], (f[2] - f[0]) / (f[4] - f[0])
    cfg = TrainConfig(arch="perl-tiny", pretrained="embedded", dataset="ToyShapes",
                      data_root=str(shapes_world), shots=2, num_steps=2)
    est = E.estimate([("a", cfg), ("b", cfg.replace(seed=2))], bench, overhead_s=0.0)
    a, b = est.cells
    assert a.train_s == pytest.approx(5 * 1.0 * full) and a.eval_s == pytest.approx(0.8 * full)
    assert b.eval_s == pytest.approx(80 / 400 * thought)
    assert len(est.warnings) == 1 and "J/K differs" in est.warnings[0]
    assert "K=2" in est.warnings[0] and "K=4" in est.warnings[0]

    other = E.estimate([("c", cfg.replace(arch="ViT-B-16-quickgelu", num_steps=4))], bench,
                       overhead_s=0.0)
    assert "arch differs" in other.warnings[0] and "bench the sweep's arch" in other.warnings[0]
    ratio = E.flops("ViT-B-16-quickgelu", 7, 4)[0] / E.flops("perl-tiny", 7, 4)[0]
    assert other.cells[0].eval_s == pytest.approx(0.8 * ratio)


# --- without a bench file, and bad bench files ----------------------------------------------------


def test_without_bench_only_the_workload_and_how_to_measure(tmp_path, shapes_world, capsys):
    rc, out = dry_run([str(sweep(tmp_path, shapes_world)), "--dry-run"], capsys)
    assert rc == 0, out
    assert "workload of 2 cell(s) to run: 10 training steps, 160 images evaluated" in out
    assert "python -m perl_core.bench --arch perl-tiny --json > bench.json" in out
    assert "GPU-h" not in out and "estimated GPU time" not in out
    rc, out = dry_run([str(sweep(tmp_path, shapes_world)), "--bench", "b.json"], capsys)
    assert rc == 2 and "--dry-run" in out


def test_unreachable_tracking_server_still_shows_the_work(tmp_path, shapes_world, capsys,
                                                          monkeypatch):
    from servers import free_port  # tests/servers.py

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast; user values win
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    y = sweep(tmp_path, shapes_world)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rc, out = dry_run([str(y), "--dry-run", "--tracking-uri", down], capsys)
    assert rc == 0, out
    assert f"tracking store {down} not readable" in out and "a real run would stop here" in out
    assert "total: 2 cells, 0 done, 2 todo" in out


@pytest.mark.parametrize("change, words", [
    (None, ["cannot read the bench file", "perl_core.bench"]),
    ("{not json", ["not JSON (line 1"]),
    ("[1, 2]", ["expected a JSON object"]),
    ({"perl_eval_img_per_s_cached": None}, ["missing key(s) ['perl_eval_img_per_s_cached']"]),
    ({"perl_eval_img_per_s_uncached": 0}, ["'perl_eval_img_per_s_uncached'", "got 0"]),
    ({"train_step_s_by_classes": {"100": {"cached": 1.0, "uncached": -3}}},
     ["'train_step_s_by_classes.100.uncached'", "got -3"]),
    ({"train_step_s_by_classes": {"100": {"cached": 1.0}}},
     ["'train_step_s_by_classes.100.uncached' is missing"]),
    ({"train_step_s_by_classes": {"many": {"cached": 1.0, "uncached": 2.0}}},
     ["'train_step_s_by_classes.many'", "not a class count"]),
    ({"arch": "no-such-arch"}, ["key 'arch'", "no-such-arch"]),
])
def test_a_bad_bench_file_is_refused_naming_file_and_key(tmp_path, shapes_world, capsys, change,
                                                         words):
    path = tmp_path / "gpu-bench.json"
    if isinstance(change, str):
        path.write_text(change)
    elif isinstance(change, dict):
        data = {**BENCH, **change}
        path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    rc, out = dry_run([str(sweep(tmp_path, shapes_world)), "--dry-run", "--bench", str(path)],
                      capsys)
    assert rc == 2, out
    assert str(path) in out
    for w in words:
        assert w in out, out
    assert "estimated GPU time" not in out
    from pipeline.status import main as status

    assert status([str(sweep(tmp_path, shapes_world)), "--bench", str(path)]) == 2
    assert str(path) in capsys.readouterr().out.replace("\n", "")


# --- the size table against the real split files --------------------------------------------------


@pytest.mark.skipif(not REAL_SPLITS.is_dir(), reason="real CoOp split files not present")
def test_size_table_matches_the_real_split_files():
    names = {"Caltech101": "Caltech101", "DescribableTextures": "DTD", "EuroSAT": "EuroSAT",
             "OxfordFlowers": "Flowers102", "OxfordPets": "OxfordPets",
             "StanfordCars": "StanfordCars", "UCF101": "UCF101"}
    checked = 0
    for f in sorted(REAL_SPLITS.glob("split_zhou_*.json")):
        name = names[f.stem[len("split_zhou_"):]]
        split = json.loads(f.read_text())
        classes = len({y for _, y, _ in split["train"]})
        assert E.COOP_SIZES[name] == (classes, len(split["test"])), name
        checked += 1
    assert checked == 7


# --- expected peak memory per trial (issue 18) ---------------------------------------------------


def _step_mb(cfg: TrainConfig, classes: int, l_eff: int) -> float:
    return E.trial_memory(cfg, classes, l_eff).step_gb * 1024


def test_memory_formula_against_the_cpu_measurement():
    # docs/benchmarks.md, "Text memory": ViT-B/16, 4 images, K=4, J=7, fp32, added MB per step
    cfg = TrainConfig(dataset="ImageNet", pretrained="", batch_size=4, num_steps=4)
    whole = cfg.replace(text_chunk=0)
    assert _step_mb(whole, 100, 14) == pytest.approx(1870, rel=0.02)  # the two rows it is fit to
    assert _step_mb(whole, 1000, 18) == pytest.approx(10781, rel=0.02)
    # chunked: the live tensors (malloc returning freed blocks) 1,292 MB at 300 classes; the
    # default-malloc VmHWM (1,998 MB at 1,000) adds what glibc keeps resident
    assert _step_mb(cfg, 300, 18) == pytest.approx(1292, rel=0.1)
    assert _step_mb(cfg, 1000, 18) < 1998
    m = E.trial_memory(cfg, 1000, 18)
    assert m.chunked and m.step_gb == E.trial_memory(cfg, 10_000, 18).step_gb  # flat in C
    assert not E.trial_memory(cfg, 128, 18).chunked  # C <= text_chunk: the whole graph
    assert E.trial_memory(whole.replace(num_steps=5), 1000, 18).step_gb > \
        E.trial_memory(whole, 1000, 18).step_gb
    assert E.trial_memory(whole.replace(modality="vision"), 1000, 18).text_gb == 0
    assert m.trial_gb > m.weights_gb + m.step_gb  # context and allocator slack on a GPU
    assert E.parse_gpu_memory("40GB") == E.parse_gpu_memory("40 GiB") == 40.0
    with pytest.raises(ValueError, match="40 apples"):
        E.parse_gpu_memory("40 apples")


def test_dry_run_prints_memory_and_warns_for_the_gpu_memory(tmp_path, capsys):
    def sweep_with(chunk: int) -> str:
        p = tmp_path / f"mem{chunk}.yaml"
        p.write_text(f"""\
name: mem
experiment: test/mem
fixed:
  arch: ViT-B-16-quickgelu
  pretrained: ""
  data_root: {tmp_path / 'no-data-here'}
  dataset: ImageNet
  protocol: all
  text_chunk: {chunk}
grid:
  seed: [1, 2]
resources: {{cpu: 1, gpu: 0.25}}
storage: {tmp_path / 'runs'}
tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}
""")
        return str(p)

    rc, out = dry_run([sweep_with(0), "--dry-run", "--gpu-memory", "40GB"], capsys)
    assert rc == 0, out
    out = " ".join(out.split())
    assert "ImageNet: 1000 classes, L_eff 18, K=4, whole text graph" in out, out
    assert "warning: resources.gpu 0.25 puts 4 trials on one GPU: ImageNet needs" in out
    assert "--gpu-memory 40 GB" in out
    rc, out = dry_run([sweep_with(128), "--dry-run", "--gpu-memory", "24GB"], capsys)
    assert rc == 0, out
    out = " ".join(out.split())
    assert "text_chunk 128" in out and "warning" not in out, out
    assert "fits: 4 trial(s) per GPU (resources.gpu 0.25) within --gpu-memory 24 GB" in out
    rc, out = dry_run([sweep_with(128), "--dry-run", "--gpu-memory", "lots"], capsys)
    assert rc == 2 and "--gpu-memory 'lots'" in out
    assert not (tmp_path / "mlflow.db").exists()
