"""`python -m pipeline.aggregate`: see `pipeline.aggregate.cli`."""

from pipeline.aggregate.cli import main

raise SystemExit(main())
