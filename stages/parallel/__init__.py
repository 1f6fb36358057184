"""Tensor parallelism: one model sharded over several ranks of one host (docs/tensor_parallel.md).

Rank 0 is the daemon process (its execute thread runs each step as with one
rank); ranks 1..N-1 are worker processes it starts and supervises. Importing
this package imports no framework: `sharding` and `config` are pure Python.
"""
