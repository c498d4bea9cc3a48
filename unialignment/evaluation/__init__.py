"""Evaluation: SemGen-Bench generation, VLM-judge scoring and the per-task report."""
