"""DNA experiment (paper §4.3): see run.py and README.md."""
