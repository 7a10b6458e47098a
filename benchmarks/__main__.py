"""``python -m benchmarks``: the parity report (see benchmarks/parity_report.py)."""

from benchmarks.parity_report import main

raise SystemExit(main())
