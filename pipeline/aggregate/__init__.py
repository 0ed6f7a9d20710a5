"""`python -m pipeline.aggregate`: MLflow runs -> the paper's tables, plots and an HTML report.

    python -m pipeline.aggregate [SWEEP.yaml] [--experiment NAME ...] [--tracking-uri URI]
                                 [--out DIR] [--ui-url URL] [--no-log]

Reads trial runs with `MlflowClient.search_runs` (paged; Ray is not needed), casts their params
to `TrainConfig` types, keeps one run per `config_hash` (the latest FINISHED one), groups seeds
(mean, sample std, n) and rebuilds, for whichever runs exist:

- Tables 1/5 (base-to-novel: Base / Novel / HM per dataset, both HM conventions),
- Table 2 (cross-dataset) and Table 8 (domain generalisation): source, targets, Target Avg,
- Table 3 (modality), Table 4 (loop variants), Fig. 3a (inject_layer), Fig. 3b (num_steps), the
  alignment ablation (anchor_weight), any other ablation (rows = the fields the sweep's grid
  varies; in a sweep with arms, a block of rows per arm, from the runs' `arm` tags), the
  sensitivity table (arms that each change one setting, against the first arm),
- per-step dynamics (acc / confidence / Brier / KL / input Jacobian / image-text alignment at
  steps 0..K, each as the mean over datasets and pooled over test images, Fig. 7's convention)
  and Fig. 5's drift groups.

Each of our numbers carries the paper's number and ours - paper where the paper prints one
(`pipeline.reference`); cells never run are `—`, cells whose runs all failed are `FAILED (k)`.
Outputs (Markdown, CSV, LaTeX, PNG, report.html) go to `--out` and, unless `--no-log`, are
logged as artifacts of a run in the `aggregate` experiment.

Averaging conventions (data_protocol.md §9): per dataset, Base and Novel are means over seeds; HM
is reported both as the mean of per-seed HMs (PERL's convention) and as HM(mean B, mean N)
(CoOp's). Over datasets, Base/Novel/HM(PERL) are arithmetic means of the per-dataset values and
HM(CoOp) is HM(Avg Base, Avg Novel). The ± of an average is the std over seeds of the per-seed
average, over the seeds present in every dataset of that average.

The stages, one module each, in reading order: `read` (store -> DataFrame, the recorded grid
axes), `runs` (one run per config hash and seed -> a Pool of cells), `views` (a sweep's runs per
experiment and protocol, its axes and arms), `pooling` (a cell's numbers over seeds / datasets),
the table families (`b2n`, `ablation` with `loop`, `sensitivity`, `transfer`, `dynamics`,
`search`), `build` (the driver), `output` (files, plots, report, the aggregate run) and `cli`.
`result` is the type the report reads. Shared rules come from their one home: the store layout
and phase names from `pipeline.layout`, the MLflow queries from `pipeline.queries`, the param
decoding from `perl_core.config.decode_param`, the evalset rules from `perl_core.protocol`.
"""

# What other code and tests import from `pipeline.aggregate` itself.
from pipeline.aggregate.build import Aggregate, aggregate, build_tables
from pipeline.aggregate.cli import main
from pipeline.aggregate.output import log_to_mlflow, summary_markdown, write_outputs
from pipeline.aggregate.read import cast_params, runs_frame
from pipeline.aggregate.runs import resolve
from pipeline.aggregate.views import sweep_views

__all__ = ["Aggregate", "aggregate", "build_tables", "main", "log_to_mlflow", "summary_markdown",
           "write_outputs", "cast_params", "runs_frame", "resolve", "sweep_views"]
