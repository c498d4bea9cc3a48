# Stage 3: supervised fine-tuning on curated data and question-answer data, text-loss weight 1.0.
_base_ = ["_base_/model.py", "_base_/components.py", "_base_/data.py", "_base_/schedule.py", "_base_/deepspeed.py"]

work_dir = "runs/stage3_sft"
model = dict(load_from="runs/stage2_multitask/export/ema")
data = dict(
    groups=[
        dict(name="t2i", weight=1, datasets=[dict(path="data/sft_t2i.jsonl", task="t2i")]),
        dict(name="edit", weight=1, datasets=[dict(path="data/sft_edit.jsonl", task="edit")]),
        dict(name="vqa", weight=1, datasets=[dict(path="data/vqa.jsonl", task="understanding")]),
    ],
)
objective = dict(weights=dict(text=1.0))
