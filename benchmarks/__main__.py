"""``python -m benchmarks``: every implementation side by side and the parity report
(see benchmarks/suite.py)."""

from benchmarks.suite import main

raise SystemExit(main())
