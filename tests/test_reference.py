"""The packaged paper reference: parsing, known values, and the averaging-convention check."""

from __future__ import annotations

import csv
import io
import math
import statistics
from importlib import resources

import pytest

from pipeline import reference as ref


def _raw_rows() -> list[dict[str, str]]:
    text = resources.files("pipeline.reference").joinpath(ref.CSV_NAME).read_text("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def test_loader_parses_every_row():
    raw = _raw_rows()
    rows = ref.load_reference()
    assert len(rows) == len(raw) > 1000
    for r, d in zip(rows, raw):
        assert r.text == d["value"]  # printed digits kept unchanged
        assert math.isclose(r.value, float(d["value"]))
        assert (r.table, r.method, r.dataset, r.metric) == (
            d["table"], d["method"], d["dataset"], d["metric"])
    assert {r.table for r in rows} == {"T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8",
                                      "F1", "F3a", "F3b", "F7"}
    # (table, method, dataset, metric) identifies a number: paper_value is unambiguous
    keys = [(r.table, r.method, r.dataset, r.metric) for r in rows]
    assert len(keys) == len(set(keys))


def test_parse_rows_rejects_bad_input():
    header = ",".join(ref.COLUMNS)
    with pytest.raises(ValueError, match="header"):
        ref.parse_rows("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="line 2"):
        ref.parse_rows(f"{header}\nT1,base2novel,PERL,6K,DTD,hm,n/a,\n")


@pytest.mark.parametrize("table,method,dataset,metric,value", [
    ("T1", "PERL", "average", "hm", 74.79),
    ("T1", "PERL", "average", "base", 73.97),
    ("T1", "PERL", "average", "novel", 75.74),
    ("T2", "PERL", "target_average", "acc", 65.56),
    ("T2", "PERL", "ImageNet", "acc", 70.25),
    ("T5", "PERL", "EuroSAT", "hm", 69.62),
    ("T8", "PERL", "target_average", "acc", 59.95),
    ("T3", "Vision only", "average", "hm", 71.72),
    ("T4", "PERL-LayerStep", "average", "hm", 76.37),
    ("F3b", "PERL K=4", "average", "hm", 74.79),
])
def test_known_values(table, method, dataset, metric, value):
    assert ref.paper_value(table, method, dataset, metric) == pytest.approx(value, abs=1e-9)


def test_missing_reference_is_none():
    assert ref.paper_value("T5", "PERL", "ToyShapes", "hm") is None
    assert ref.paper_value("T1", "PERL", "average", "brier") is None


def test_figure_values_are_flagged_approximate():
    assert ref.paper_entry("F3b", "PERL K=2", "average", "hm").approximate
    assert not ref.paper_entry("F3b", "PERL K=4", "average", "hm").approximate
    assert not ref.paper_entry("T1", "PERL", "average", "hm").approximate


def test_perl_average_hm_is_mean_of_per_dataset_hms():
    """PERL's convention (PERL.md §5, data_protocol §9): Avg HM = mean of the 11 per-dataset HMs,
    not the HM of the averaged Base and Novel (which would be 74.84)."""
    hms = [ref.paper_value("T1", "PERL", d, "hm") for d in ref.B2N_DATASETS]
    assert len(hms) == 11 and None not in hms
    avg = ref.paper_value("T1", "PERL", "average", "hm")
    assert statistics.mean(hms) == pytest.approx(avg, abs=0.005)
    b, n = (ref.paper_value("T1", "PERL", "average", m) for m in ("base", "novel"))
    assert 2 * b * n / (b + n) == pytest.approx(74.84, abs=0.005)
    assert abs(2 * b * n / (b + n) - avg) > 0.04


def test_averages_of_base_and_novel_are_means_of_table5():
    for metric in ("base", "novel"):
        vals = [ref.paper_value("T5", "PERL", d, metric) for d in ref.B2N_DATASETS]
        assert statistics.mean(vals) == pytest.approx(
            ref.paper_value("T1", "PERL", "average", metric), abs=0.005)


def test_target_average_is_mean_of_targets():
    xd = [ref.paper_value("T2", "PERL", d, "acc") for d in ref.XD_TARGETS]
    assert statistics.mean(xd) == pytest.approx(65.56, abs=0.005)
    dg = [ref.paper_value("T8", "PERL", d, "acc") for d in ref.DG_TARGETS]
    assert statistics.mean(dg) == pytest.approx(59.95, abs=0.005)


def test_dataset_names_map_only_real_benchmarks():
    assert ref.paper_dataset("Caltech101") == "Caltech101"
    assert ref.paper_dataset("imagenet_sketch") == "ImageNetSketch"
    assert ref.paper_dataset("ToyShapes") is None  # synthetic world: no paper counterpart
    assert ref.paper_dataset("") is None


def test_reference_frame_is_typed():
    df = ref.reference_frame()
    assert len(df) == len(ref.load_reference())
    assert str(df["value"].dtype) == "float64"
    sel = df[(df.table == "T1") & (df.method == "PERL") & (df.dataset == "average")
             & (df.metric == "hm")]
    assert sel["value"].tolist() == [74.79]
