# Toy stage 1: text-to-image + captioning (every prompt is also a captioning target), from scratch.
_base_ = ["_base_/toy_world.py"]

work_dir = "runs/toy/aligned/stage1_t2i_caption"
data = dict(groups=[dict(name="t2i", weight=1, datasets=[dict(path="runs/toy/world/train/t2i.jsonl", task="t2i")])])
max_steps = 1200
