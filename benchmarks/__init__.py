"""seqtwin benchmarks: scripts that run both backends side by side.

``python -m benchmarks`` runs the parity report (benchmarks/parity_report.py):
every implemented layer in ``reference`` and ``torch_impl`` on random inputs,
with relative errors against the DESIGN.md budgets and wall times.
"""
