"""Training data: JSONL records of every task, their index and validation, image and text preparation, task
mixing across steps and ranks, and the offline feature cache."""
