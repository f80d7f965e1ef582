"""MQAR: Mamba-1 vs Mamba-2 vs attention (Mamba-2 paper §9.1, Figure 8). Run: python -m experiments.mqar"""
