"""seqtwin benchmarks: scripts that run both backends side by side.

``python -m benchmarks`` (benchmarks/suite.py) runs every suite: layers, models, generation
and scaling (bench_<suite>.py, each also runnable on its own) against the anchors, then the
parity report (benchmarks/parity_report.py). bench_recurrent.py and bench_attention.py are
the per-layer deep dives behind the committed results in results/<machine>/;
bench_recurrent_sweep.py sweeps RNN, LSTM and GRU over batch, length and hidden size.
The ratios of these three are timed as harness.py describes: interleaved in one process,
repeated in fresh processes, reported as the median and min-max over them.
"""

import os

# OpenBLAS (numpy's BLAS) keeps its worker threads spinning for about 2**28 cycles after each
# call. In an interleaved round the torch call that follows a reference call then shares the
# cores with them: measured on a B32 T64 H512 GRU, the call after a NumPy call took 180 ms
# instead of 107 ms. 2**4 cycles makes them sleep at once; the reference's own times do not
# change. It must be set before numpy loads OpenBLAS, so here and in every worker's environment.
OPENBLAS_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4"}
for _name, _value in OPENBLAS_ENV.items():
    os.environ.setdefault(_name, _value)
