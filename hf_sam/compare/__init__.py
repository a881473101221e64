"""Comparing training methods over seeds: `hf-sam compare` and the statistics it shares with the benefit benchmark.

- `hf_sam.compare.stats`: the paired difference to a baseline over seeds with its 95% t interval, per-group summaries,
  the markdown table and the benefit-vs-cost plot (`benchmarks/bench_benefit.py` uses the same functions);
- `hf_sam.compare.runner`: `hf-sam compare`, which runs a training script once per (method, seed) and summarises the
  metrics the Trainer wrote.

A tool, not part of the trainer: `import hf_sam` does not load this package.
"""
