"""Benchmarks: speed and memory as ratios measured side by side, and the paper's tables."""
