"""Language modelling experiment (paper §4.2, pattern): Mamba vs a Transformer++ of equal parameter count,
the same tokens, on Shakespeare with held-out plays. See run.py and README.md."""
