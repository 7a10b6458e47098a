"""seqtwin benchmarks: scripts that run both backends side by side.

``python -m benchmarks`` (benchmarks/suite.py) runs every suite: layers, models, generation
and scaling (bench_<suite>.py, each also runnable on its own) against the anchors, then the
parity report (benchmarks/parity_report.py). bench_recurrent.py and bench_attention.py are
the per-layer deep dives behind the committed results in results/<machine>/;
bench_recurrent_sweep.py sweeps RNN, LSTM and GRU over batch, length and hidden size.
The ratios of these three are timed as harness.py describes: interleaved in one process,
repeated in fresh processes, reported as the median and min-max over them.
"""
