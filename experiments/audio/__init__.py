"""Audio experiments (paper §4.4): see run.py and README.md."""
