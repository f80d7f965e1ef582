"""Experiment 1: Selective Copying (Mamba paper §4.1.1, Table 1). Run: python -m experiments.selective_copying"""
