"""Experiment 2: Induction Heads (Mamba paper §4.1.2, Table 2). Run: python -m experiments.induction_heads"""
