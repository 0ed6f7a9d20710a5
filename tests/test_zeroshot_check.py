"""The zero-shot check (pipeline/zeroshot.py) and the step-0 columns of the B2N table.

Known-answer test: perl-tiny on the toy world's test splits (seed 0, 24 test images per class,
as in MODEL_CARD.md) must reproduce the model card's zero-shot numbers, and the check must flag
each breakage the issue names (class names, split, preprocessing, activation, template), each
put in through monkeypatch. The world is generated once per module with the card's test splits
and a single train / val image per class (test images do not depend on the train size: every
image has its own generator keyed by dataset, split, label and index).
"""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from pathlib import Path

import pytest
import torch

from perl_core.config import TrainConfig
from pipeline import zeroshot as zs

CARD = Path(__file__).resolve().parents[1] / "perl_core" / "assets" / "MODEL_CARD.md"
# ToyWorld (1,008 test images) is left to the card/JSON agreement test, for time
TOY = ("ToyShapes", "ToyPatterns", "ToyCounts")


@pytest.fixture(scope="module")
def card_world(tmp_path_factory) -> Path:
    from perl_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("card-world")
    generate_world(root, seed=zs.toy_reference()["world"]["seed"], datasets=list(TOY),
                   sizes={"train": 1, "val": 1,
                          "test": zs.toy_reference()["world"]["test_per_class"]})
    return root


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # shared 2-core machines: tiny models do not gain from threads
    yield


def _cfgs(root: Path, *datasets: str, **fields) -> list[TrainConfig]:
    return [TrainConfig(dataset=d, arch="perl-tiny", pretrained="embedded", data_root=str(root),
                        shots=1, device="cpu", seed=s, **fields) for d in datasets for s in (1, 2)]


def _check(root: Path, *datasets: str, tolerance: float = zs.DEFAULT_TOLERANCE,
           cache_dir: Path | None = None, **fields) -> tuple[zs.Outcome, list[str], int]:
    """The check on `datasets` (cells with `fields`, e.g. a protocol and its eval_datasets);
    with `cache_dir`, a fresh fp32 FeatureCache there (the two templates then share the image
    features; fresh, because its key does not see a patched activation)."""
    from perl_core.cache import FeatureCache

    lines: list[str] = []
    cfgs = _cfgs(root, *datasets, **fields)
    cache = FeatureCache(str(cache_dir), dtype=torch.float32) if cache_dir else None
    out = zs.run_check(cfgs, cache_for=(lambda c: cache) if cache is not None else None,
                       say=lines.append)
    if cache is not None:
        assert cache.stats().get("image/hit", 0) >= 1, cache.stats()  # shared by the templates
    rc = zs.report(out, tolerance, zs.check_configs(cfgs), lines.append)
    return out, lines, rc


# --- the reference file and the model card -------------------------------------------------------


def test_reference_json_agrees_with_model_card():
    from perl_core.data.synthetic import DEFAULT_SIZES, GENERATOR_VERSION, toy_dataset

    ref = zs.toy_reference()
    text = CARD.read_text()
    section = text[text.index("## Zero-shot accuracy"):text.index("## 16-shot PERL")]

    def num(x: str) -> float | None:
        return None if x == "-" else float(x)

    rows = {m[0]: tuple(map(num, m[1:])) for m in  # (base, novel, all); "-": test-only
            re.findall(r"^\| (Toy\w+) \| ([\d.]+|-) \| ([\d.]+|-) \| ([\d.]+) \|", section,
                       re.M)}
    own = {m[0]: tuple(map(float, m[1:])) for m in
           re.findall(r"(Toy\w+) (?:scores )?([\d.]+) / ([\d.]+) / (\d+\.\d)", section)}
    assert set(rows) == set(ref["datasets"]) and set(own) == {"ToyPatterns", "ToyCounts"}
    assert {"ToyWorldV2", "ToyWorldSketch", "ToyWorldClutter"} <= set(rows)  # the DG targets

    def triple(e: dict) -> tuple:
        return (e.get("base"), e.get("novel"), e["all"])

    for name, entry in ref["datasets"].items():
        assert triple(entry["generic"]) == rows[name], name
        # "The other datasets use the generic template, so their numbers do not change."
        assert triple(entry["coop"]) == own.get(name, rows[name]), name
        d = toy_dataset(name)
        per_class = ref["world"]["test_per_class"]
        want = ({"all": len(d.classnames()) * per_class} if d.test_only else
                {"base": d.num_base() * per_class,
                 "novel": (len(d.classnames()) - d.num_base()) * per_class})
        assert entry["test_images"] == want, name
    assert f"({ref['world']['test_per_class']} images per class)" in section
    assert "seed-0 world" in section and ref["world"]["seed"] == 0
    assert ref["world"]["test_per_class"] == DEFAULT_SIZES["test"]
    assert ref["world"]["generator_version"] == GENERATOR_VERSION
    assert (ref["arch"], ref["pretrained"]) == ("perl-tiny", "embedded")


# --- known answer ------------------------------------------------------------------------


def test_known_answer_perl_tiny_reproduces_the_model_card(card_world, tmp_path):
    out, lines, rc = _check(card_world, *TOY, cache_dir=tmp_path)
    assert rc == 0 and not out.errors, "\n".join(lines)
    assert [(r.dataset, r.template) for r in out.rows] == [(d, t) for d in TOY
                                                           for t in zs.TEMPLATES]
    for r in out.rows:  # the card prints one decimal: ours must round to it
        assert r.reference is not None and r.reference.compared
        assert max(abs(v) for v in r.deltas().values()) <= 0.05 + 1e-9, (r, lines)
        assert not r.count_mismatch()
    assert any(line.startswith("ToyCounts") and "coop" in line and "ok" in line for line in lines)


# --- each breakage is flagged ---------------------------------------------------------------------


def _assert_flags(out: zs.Outcome, lines: list[str], rc: int, dataset: str,
                  templates: tuple[str, ...] = zs.TEMPLATES) -> None:
    assert rc == 1, "\n".join(lines)
    flagged = {(r.dataset, r.template) for r in out.rows if r.flagged(zs.DEFAULT_TOLERANCE)}
    assert flagged == {(dataset, t) for t in templates}, ("\n".join(lines), flagged)
    msg = "\n".join(lines)
    assert f"{dataset}: zero-shot differs from model card" in msg
    # the likely causes, in the order
    pos = [msg.index(c) for c in zs.CAUSES]
    assert pos == sorted(pos)


def test_shuffled_class_names_are_flagged(card_world, monkeypatch, tmp_path):
    import perl_core.data.coop as coop

    load = coop.load_splits

    def shuffled(*a, **kw):  # a class-name file in another order than the labels
        s = load(*a, **kw)
        names = list(s.classnames)
        return dataclasses.replace(s, classnames=tuple(names[1:] + names[:1]))

    monkeypatch.setattr(coop, "load_splits", shuffled)
    _assert_flags(*_check(card_world, "ToyShapes", cache_dir=tmp_path), "ToyShapes")


def test_wrong_normalisation_is_flagged(card_world, monkeypatch, tmp_path):
    import perl_core.data.transforms as tr
    from torchvision import transforms as T

    make = tr.eval_transform

    def imagenet_stats(size=224):  # torchvision's ImageNet mean/std instead of CLIP's
        t = make(size)
        t.transforms[-1] = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        return t

    monkeypatch.setattr(tr, "eval_transform", imagenet_stats)
    _assert_flags(*_check(card_world, "ToyCounts", cache_dir=tmp_path), "ToyCounts")


def test_wrong_resize_is_flagged(card_world, monkeypatch, tmp_path):
    import perl_core.data.transforms as tr
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    def resize_256_crop_224(size=224):  # the ImageNet habit: resize to 8/7 of the crop, then crop
        return T.Compose([T.Resize(size * 8 // 7, interpolation=InterpolationMode.BICUBIC),
                          T.CenterCrop(size), T.ToTensor(), tr.normalize()])

    monkeypatch.setattr(tr, "eval_transform", resize_256_crop_224)
    _assert_flags(*_check(card_world, "ToyShapes", cache_dir=tmp_path), "ToyShapes")


def test_wrong_template_is_flagged(card_world, monkeypatch, tmp_path):
    import perl_core.data.templates as tp

    monkeypatch.setattr(tp, "template_for", lambda dataset, template="generic":
                        tp.GENERIC_TEMPLATE)  # the coop choice never reaches the prompts
    out, lines, rc = _check(card_world, "ToyCounts", cache_dir=tmp_path)
    # only the coop row is off: the generic row still matches its reference
    _assert_flags(out, lines, rc, "ToyCounts", templates=("coop",))


def test_gelu_instead_of_quickgelu_is_flagged(card_world, monkeypatch, tmp_path):
    import open_clip.transformer as oct

    import perl_core.train as train

    build = train.build_model

    def gelu(cfg, clip=None):  # perl-tiny was trained with QuickGELU
        model = build(cfg, clip)
        for m in model.clip.modules():
            if isinstance(m, oct.ResidualAttentionBlock):
                m.mlp.gelu = torch.nn.GELU()
        return model

    monkeypatch.setattr(train, "build_model", gelu)
    _assert_flags(*_check(card_world, "ToyShapes", cache_dir=tmp_path), "ToyShapes")


def test_partial_split_is_flagged_with_the_counts(card_world, monkeypatch, tmp_path):
    import perl_core.data.coop as coop

    load = coop.load_splits

    def partial(*a, **kw):  # every other test image lost (an interrupted copy)
        s = load(*a, **kw)
        return dataclasses.replace(s, test=s.test[::2])

    monkeypatch.setattr(coop, "load_splits", partial)
    out, lines, rc = _check(card_world, "ToyPatterns", tolerance=100.0,
                            cache_dir=tmp_path)  # counts alone flag it
    assert rc == 1 and all(r.count_mismatch() for r in out.rows)
    assert "the full split has 480" in "\n".join(lines)


# --- cross-dataset / domain-generalisation targets: full test sets among all classes -----------

XD = dict(protocol="cross_dataset", eval_datasets=("ToyCounts",))  # ToyShapes -> one small target


@pytest.fixture(scope="module")
def dg_world(tmp_path_factory) -> Path:
    """ToyWorld and one shifted variant, with the card's test splits (the DG sweep's roles)."""
    from perl_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("dg-world")
    generate_world(root, seed=zs.toy_reference()["world"]["seed"],
                   datasets=["ToyWorld", "ToyWorldSketch"],
                   sizes={"train": 1, "val": 1,
                          "test": zs.toy_reference()["world"]["test_per_class"]})
    return root


def _assert_all_rows_reproduce_the_card(out: zs.Outcome, lines: list[str], rc: int,
                                        datasets: tuple[str, ...]) -> None:
    assert rc == 0 and not out.errors, "\n".join(lines)
    assert [(r.dataset, r.template) for r in out.rows] == [(d, t) for d in datasets
                                                           for t in zs.TEMPLATES]
    for r in out.rows:  # each on its full test set, among all its classes, to the card's rounding
        assert r.base is None and r.all is not None and r.reference.compared, r
        assert set(r.deltas()) == {"all"} and abs(r.deltas()["all"]) <= 0.05 + 1e-9, (r, lines)
        assert r.test_images == (r.reference.test_images,)


def test_known_answer_cross_dataset_source_and_target(card_world, tmp_path):
    out, lines, rc = _check(card_world, "ToyShapes", cache_dir=tmp_path, **XD)
    _assert_all_rows_reproduce_the_card(out, lines, rc, ("ToyShapes", "ToyCounts"))
    counts = {r.template: r for r in out.rows if r.dataset == "ToyCounts"}
    # the card: ToyCounts all 34.4 (generic), 35.3 (its own template): the templates do differ
    assert (counts["generic"].reference.all, counts["coop"].reference.all) == (34.4, 35.3)
    assert counts["coop"].classes == 15 and counts["coop"].test_images == (360,)
    assert "ref all" in lines[0] and "Δ all" in lines[0]


def test_known_answer_domain_generalization_target(dg_world, tmp_path):
    out, lines, rc = _check(dg_world, "ToyWorld", cache_dir=tmp_path,
                            protocol="domain_generalization", eval_datasets=("ToyWorldSketch",))
    _assert_all_rows_reproduce_the_card(out, lines, rc, ("ToyWorld", "ToyWorldSketch"))
    assert {r.reference.all for r in out.rows} == {38.5, 23.6}  # the card's "all" column


def _rotated_names(monkeypatch, dataset: str) -> None:
    import perl_core.data.coop as coop

    load = coop.load_splits

    def rotated(name, *a, **kw):  # one dataset's class-name list in another order than its labels
        s = load(name, *a, **kw)
        if name != dataset:
            return s
        names = list(s.classnames)
        return dataclasses.replace(s, classnames=tuple(names[1:] + names[:1]))

    monkeypatch.setattr(coop, "load_splits", rotated)


def test_broken_class_list_of_one_target_is_flagged(card_world, monkeypatch, tmp_path):
    _rotated_names(monkeypatch, "ToyCounts")
    out, lines, rc = _check(card_world, "ToyShapes", cache_dir=tmp_path, **XD)
    _assert_flags(out, lines, rc, "ToyCounts")  # the target only, both templates; not the source
    assert "ToyCounts evaluated 15-way, with its own class names" in "\n".join(lines)


def test_partial_target_split_is_flagged_with_the_counts(card_world, monkeypatch, tmp_path):
    import perl_core.data.coop as coop

    load = coop.load_splits

    def partial(name, *a, **kw):  # the target's copy lost every other test image
        s = load(name, *a, **kw)
        return dataclasses.replace(s, test=s.test[::2]) if name == "ToyCounts" else s

    monkeypatch.setattr(coop, "load_splits", partial)
    out, lines, rc = _check(card_world, "ToyShapes", tolerance=100.0, cache_dir=tmp_path, **XD)
    assert rc == 1 and out.flagged(100.0) == ["ToyCounts"], "\n".join(lines)
    assert "evaluated 180 test images, the full split has 360" in "\n".join(lines)


def test_missing_target_is_exit_2_and_keeps_the_source(card_world, tmp_path):
    out, lines, rc = _check(card_world, "ToyShapes", cache_dir=None, protocol="cross_dataset",
                            eval_datasets=("DTD",))  # a real benchmark that is not there
    assert rc == 2 and [r.dataset for r in out.rows] == ["ToyShapes"] * 2
    assert len(out.errors) == 1 and out.errors[0].startswith("DTD (data_root")


def test_check_configs_of_target_sweeps():
    base = TrainConfig(arch="ViT-B-16-quickgelu", pretrained="openai", data_root="/data",
                       num_steps=4, jacobian_samples=8)
    dg = [base.replace(dataset="imagenet", protocol="domain_generalization", seed=s)
          for s in (1, 2)]  # no eval_datasets: ImageNet's four registered variants
    xd = base.replace(dataset="ImageNet", protocol="cross_dataset",
                      eval_datasets=("DTD", "eurosat"))
    checks = zs.check_configs([*dg, xd, base.replace(dataset="DTD")])
    assert [(c.protocol, zs.checked_dataset(c)) for c in checks] == [
        ("all", "ImageNet"), *(("domain_generalization", t) for t in
                               ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")),
        ("cross_dataset", "DTD"), ("cross_dataset", "EuroSAT"), ("base2novel", "DTD")]
    assert all(c.num_steps == 0 and c.jacobian_samples == 0 for c in checks)


# --- references, messages, exit codes -----------------------------------------------------


def test_paper_reference_is_the_clip_row_and_only_coop_is_compared():
    cfg = TrainConfig(dataset="DTD", arch="ViT-B-16-quickgelu", pretrained="openai")
    coop, _ = zs.reference_for(cfg, "coop")
    generic, _ = zs.reference_for(cfg, "generic")
    # Table 5's CLIP row for DTD (pipeline/reference/reference_results.csv)
    assert (coop.base, coop.novel, coop.hm) == (53.24, 61.30, 56.99)
    assert coop.compared and not generic.compared and coop.test_images == 1692
    none, why = zs.reference_for(cfg.replace(arch="ViT-L-14"), "coop")
    assert none is None and "ViT-B/16" in why
    assert zs.reference_for(cfg.replace(dataset="ToyShapes"), "coop")[0] is None  # not tiny
    row = zs.Row("DTD", "coop", 50.0, 61.3, 55.0, (864, 828), coop)
    assert row.flagged(1.5) and not row.flagged(3.3)
    info = zs.Row("DTD", "generic", 40.0, 40.0, 40.0, (864, 828), generic)
    assert not info.flagged(1.5)  # generic vs a coop-template reference: information only
    msg = "\n".join(zs.explain("DTD", [row], 1.5, cfg.replace(arch="ViT-B-16")))
    assert "Δ base −" in msg.replace("-", "−") and "arch ViT-B-16 with pretrained=openai" in msg
    assert "'{} texture.'" in msg  # the coop template in use


def test_paper_reference_of_full_test_sets_is_table_8s_clip_row():
    cfg = TrainConfig(dataset="ImageNet", arch="ViT-B-16-quickgelu", pretrained="openai",
                      protocol="domain_generalization")
    # Table 8's CLIP row (pipeline/reference/reference_results.csv) and the full test sets
    want = {"ImageNet": (66.73, 50000), "ImageNetV2": (60.83, 10000),
            "ImageNetSketch": (46.15, 50889), "ImageNetA": (47.77, 7500),
            "ImageNetR": (73.96, 30000)}
    for name, (acc, n) in want.items():
        coop, _ = zs.reference_for(cfg, "coop", dataset=name, full=True)
        generic, _ = zs.reference_for(cfg, "generic", dataset=name, full=True)
        assert (coop.all, coop.test_images, coop.source) == (acc, n, "paper T8 CLIP"), name
        assert coop.base is None and coop.compared and not generic.compared
    a, _ = zs.reference_for(cfg, "coop", dataset="ImageNetA", full=True)
    assert zs.Row("ImageNetA", "coop", None, None, None, (7500,), a, all=44.0).flagged(1.5)
    assert not zs.Row("ImageNetA", "coop", None, None, None, (7500,), a, all=47.0).flagged(1.5)
    assert zs.Row("ImageNetA", "coop", None, None, None, (7000,), a, all=47.77).flagged(1.5)
    assert zs.reference_for(cfg.replace(arch="ViT-L-14"), "coop", dataset="ImageNetA",
                            full=True)[0] is None
    # Table 2 has no CLIP row: ours only, "no reference", but the full split's count is checked
    dtd, _ = zs.reference_for(cfg, "coop", dataset="DTD", full=True)
    assert not dtd.has_values() and dtd.test_images == 1692 and "no reference" in dtd.source
    ok = zs.Row("DTD", "coop", None, None, None, (1692,), dtd, all=10.0)
    short = zs.Row("DTD", "coop", None, None, None, (1000,), dtd, all=44.0)
    assert not ok.flagged(1.5) and ok.deltas() == {} and short.flagged(1.5)
    table = zs.format_table([ok, short], 1.5)
    assert table[2].endswith("no ref") and table[3].endswith("FLAG") and "no reference" in table[2]
    assert "the full split's test count" in zs.explain("DTD", [short], 1.5, cfg)[0]


def test_other_world_seed_has_no_reference(tmp_path):
    (tmp_path / "synthetic_world.json").write_text(json.dumps({"seed": 5,
                                                               "generator_version": 2}))
    cfg = TrainConfig(dataset="ToyShapes", arch="perl-tiny", pretrained="embedded",
                      data_root=str(tmp_path))
    ref, why = zs.reference_for(cfg, "generic")
    assert ref is None and "seed 5" in why


def _sweep(tmp_path: Path, root: Path, datasets: str = "[ToyShapes]") -> Path:
    p = tmp_path / "zs.yaml"
    p.write_text(textwrap.dedent(f"""\
        name: zs
        experiment: test/zs
        fixed: {{protocol: base2novel, arch: perl-tiny, pretrained: embedded,
                 data_root: {root}, shots: 1, device: cpu}}
        grid: {{dataset: {datasets}, seed: [1, 2]}}
        storage: {tmp_path / 'runs'}
        cache: {{url: {tmp_path / 'cache'}}}
        """))
    return p


def test_run_zero_shot_check_cli(card_world, tmp_path, capsys):
    from pipeline import run

    sweep = _sweep(tmp_path, card_world)
    assert run.main([str(sweep), "--zero-shot-check"]) == 0
    printed = capsys.readouterr().out
    assert "ToyShapes" in printed and "model card" in printed and "0 flagged" in printed
    assert not (tmp_path / "runs").exists()  # evaluates only: no tracking store, no storage
    assert run.main([str(sweep), "--zero-shot-check", "--tolerance", "-1"]) == 2
    assert run.main([str(sweep), "--tolerance", "1"]) == 2  # only with --zero-shot-check
    assert zs.main([str(sweep), "--tolerance", "0"]) == 1  # nothing reproduces to 0.00


def test_unreadable_dataset_is_exit_2(tmp_path, capsys):
    empty = tmp_path / "no-world"  # a real benchmark that is not there: nothing generated
    sweep = _sweep(tmp_path, empty, "[DTD]")
    assert zs.main([str(sweep)]) == 2
    assert "cannot evaluate DTD" in capsys.readouterr().out


# --- the B2N table's step-0 columns -------------------------------------------------------------


def test_b2n_table_step0_columns_beside_the_clip_row():
    from fake_runs import B2N, HM, b2n_metrics, memory_runs

    from pipeline import aggregate as agg

    base = TrainConfig(protocol="base2novel", num_steps=2)
    specs = [("base2novel", base.replace(dataset=d, seed=s), b2n_metrics(b, n, K=2))
             for d, seeds in B2N.items() for s, (b, n) in seeds.items()]
    df = agg.cast_params(agg.runs_frame(memory_runs(specs), {"7": "perl/x"}))
    pool, df = agg.resolve(df)
    (t,) = [t for t in agg.build_tables(pool, agg.sweep_views(df))
            if t.name.startswith("table1_5_base2novel")]
    rows = {r.label[0]: r for r in t.rows}
    # fake_runs: step k is (K - k) points below the final value, so step 0 = final - 2
    b0 = [b - 2 for b, _ in B2N["DTD"].values()]
    n0 = [n - 2 for _, n in B2N["DTD"].values()]
    dtd = rows["DTD"].cells
    assert dtd["base0"].mean == pytest.approx(sum(b0) / 2)
    assert dtd["novel0"].mean == pytest.approx(sum(n0) / 2)
    assert dtd["hm0"].mean == pytest.approx(sum(HM(b, n) for b, n in zip(b0, n0)) / 2)
    assert dtd["base"].mean == pytest.approx(62.0)  # the final-step columns are unchanged
    # the paper's CLIP row (Table 5) beside them, with Δ = ours - paper
    assert (dtd["base0"].paper, dtd["novel0"].paper, dtd["hm0"].paper) == (53.24, 61.30, 56.99)
    assert dtd["hm0"].diff == pytest.approx(dtd["hm0"].mean - 56.99)
    assert dtd["base"].paper != dtd["base0"].paper  # PERL's row stays on the final columns
    assert rows["EuroSAT"].cells["base0"].status == "missing"  # paper row, never run
    avg = rows["Average"].cells
    assert avg["base0"].mean == pytest.approx(((91 - 2) + (62 - 2)) / 2)
    assert avg["base0"].paper == pytest.approx(69.34) and avg["base0"].diff is None  # 2 of 11
    from pipeline.tables import to_markdown

    md = to_markdown(t)
    assert "Base step 0 (ours)" in md and "HM step 0 (paper)" in md and "Δ Novel step 0" in md
    assert any("generic template" in n for n in t.notes)


def test_the_cli_takes_set_overrides_validated_like_pipeline_run(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "z.yaml"
    sweep.write_text("name: z\nexperiment: e\nfixed: {dataset: ToyShapes, arch: perl-tiny, "
                     "pretrained: embedded}\n")
    seen = {}
    monkeypatch.setattr(zs, "check_sweep", lambda spec, grid, tol: seen.update(
        datasets={c.config.dataset for c in grid}) or 0)
    assert zs.main([str(sweep), "--set", "fixed.dataset=ToyCounts"]) == 0
    assert seen["datasets"] == {"ToyCounts"}
    assert zs.main([str(sweep), "--set", "fixed.shots=true"]) == 2
    assert "--set fixed.shots" in capsys.readouterr().out
