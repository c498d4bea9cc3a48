# Stage 1: text-to-image + captioning (every t2i prompt is also a captioning target), from SD3-medium.
_base_ = ["_base_/model.py", "_base_/components.py", "_base_/data.py", "_base_/schedule.py", "_base_/deepspeed.py"]

work_dir = "runs/stage1_t2i_caption"
model = dict(load_from="checkpoints/stable-diffusion-3-medium-diffusers")
data = dict(groups=[dict(name="t2i", weight=1, datasets=[dict(path="data/t2i.jsonl", task="t2i")])])
