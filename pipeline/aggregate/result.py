"""The result type of an aggregation: the tables, the plots drawn from them and where the numbers
came from. `pipeline.report` reads this and nothing else of the aggregate."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.layout import redact_uri
from pipeline.tables import Counts, Table


@dataclass
class Result:
    tables: list[Table]
    figures: dict[str, list[Path]]  # table name -> PNGs drawn from it
    runs: pd.DataFrame  # every run read, with its `resolution`
    experiments: dict[str, str]  # experiment id -> name
    tracking_uri: str
    warnings: list[str] = field(default_factory=list)
    run_experiment: dict[str, str] = field(default_factory=dict)  # run id -> experiment id

    @property
    def counts(self) -> Counts:
        c = Counts()
        for t in self.tables:
            if t.section == "tables":
                c.expected += t.counts.expected
                c.found += t.counts.found
                c.failed += t.counts.failed
        return c

    @property
    def store(self) -> str:
        """The tracking URI without credentials (what reports and logs may show)."""
        return redact_uri(self.tracking_uri)
