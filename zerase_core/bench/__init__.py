"""Benchmarks: the cost of a Z-Erase step against the official organisation and plain ESD (``bench-cost``), how
often λ > 0 (``bench-lambda``), fresh vs pooled x_t (``bench-xt``), attention-loss memory and the real model's
memory and run-time estimates. Importing the package registers the commands."""

from . import checkpointing, cost, lambda_kinds, xt  # noqa: F401  (each registers its command)
