"""Speed and memory measurement at full size with random weights: `scripts/benchmark.py` is the command line."""
