# Stage 2: add editing, perception and composition; text-to-image and edit steps alternate 1:1.
_base_ = ["_base_/model.py", "_base_/components.py", "_base_/data.py", "_base_/schedule.py", "_base_/deepspeed.py"]

work_dir = "runs/stage2_multitask"
model = dict(load_from="runs/stage1_t2i_caption/export/ema")
data = dict(
    groups=[
        dict(name="t2i", weight=2, datasets=[dict(path="data/t2i.jsonl", task="t2i")]),
        dict(
            name="edit",
            weight=2,
            datasets=[dict(path="data/edit.jsonl", task="edit"), dict(path="data/perception.jsonl", task="perception")],
        ),
        dict(name="composition", weight=1, datasets=[dict(path="data/composition.jsonl", task="composition")]),
    ],
)
