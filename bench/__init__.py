"""Benchmarks of hermes-actors against the physical limit and the peers (issue 4).

`python -m bench` runs the five workloads of `bench.workloads` for every row (the hermes-actors
rows there, the baselines of `bench.peers`), interleaved within each repetition, and writes
`bench/results/latest.md` and `latest.png` (`bench.report`). The smoke variant (small sizes)
runs in the test suite so the harness cannot rot.
"""
