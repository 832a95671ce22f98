"""Regenerate the DSRNA paper's tables: search -> train -> attack -> verify for every row and seed.

    python -m benchmarks.paper --table all --scale cpu [--seeds 3] [--data-root DIR] [--device cuda]

Rows: DARTS (metric none), PC-DARTS (none, partial channels + edge normalisation), SDARTS-ADV, PGD
search, DSRNA-CB (clb), DSRNA-Jacobian, DSRNA-Combined. Each derived cell is trained with standard
training (the paper's robustness comes from the architecture), attacked (FGSM, PGD-100, C&W-loss
PGD-100, AutoAttack L2) and verified (certified radius by IBP, CROWN-IBP and CROWN, L-inf and L2).

Every stage is cached under ``<out>/cache/<stage>-<hash>`` by a hash of its full configuration and
of the stages it depends on, so an interrupted or extended run (more seeds, another table) only
computes what is missing. Tables (CSV + Markdown), figures (PNG), ``records.jsonl`` (one record per
row, seed and dataset) and ``run.json`` (command, git commit, versions) go to ``<out>``.

Modules: ``scales`` (rows, scales, published numbers), ``pipeline`` (the cached stages), ``tables``,
``figures``, ``run`` (the command line).
"""
from benchmarks.paper.pipeline import Pipeline
from benchmarks.paper.run import main
from benchmarks.paper.scales import PAPER_PROTOCOL, REPORTED, ROWS, SCALES, TABLES, Scale

__all__ = ["PAPER_PROTOCOL", "Pipeline", "REPORTED", "ROWS", "SCALES", "Scale", "TABLES", "main"]
