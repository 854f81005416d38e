"""The benchmarks and engine evaluation (``srnode bench KIND``, ``srnode eval``), out of the service's way.

They drive the node from outside (real peers, processes, files) and write figures to ``bench/results/``.
"""
