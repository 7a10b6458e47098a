"""Hypothesis profiles and shared pytest settings for the parity suite.

Profiles (pick with ``SEQTWIN_HYPOTHESIS_PROFILE``; ``CI`` set selects ``ci``):

- ``ci``: derandomized, no example database, few examples: the whole suite
  stays well under 10 minutes on 2 cores.
- ``dev`` (default): more examples, random seeds, local example database.
- ``thorough``: >= 500 examples per test, for a long local run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=12, derandomize=True, database=None,
                          print_blob=True, **_common)
settings.register_profile("dev", max_examples=40, **_common)
settings.register_profile("thorough", max_examples=500, **_common)

_default = "ci" if os.environ.get("CI") else "dev"
settings.load_profile(os.environ.get("SEQTWIN_HYPOTHESIS_PROFILE", _default))

# The tests run many tiny ops, where intra-op threads only add synchronisation (and, on a busy
# 2-core machine, long stalls); one thread keeps the suite fast and its timing steady.
import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU, the Triton kernels of torch_impl/kernels can only run in triton's interpreter,
# which triton fixes when it is first imported: choose it before any test module imports triton
#. Only triton kernels read the variable; on a CUDA machine they compile as usual.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
