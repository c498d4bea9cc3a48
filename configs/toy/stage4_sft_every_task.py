# Toy stage 4 of `--full` only: stage 3's fine-tuning (stage3_sft.py) with every task of the world, perception maps
# and compositions included; from the perception-and-composition stage's EMA weights.
_base_ = ["stage3_sft.py"]

work_dir = "runs/toy/aligned/stage4_sft_every_task"
model = dict(load_from="runs/toy/aligned/stage3_perception_composition/export/ema")
data = dict(
    groups=[
        dict(name="t2i", weight=3, datasets=[dict(path="runs/toy/world/train/t2i.jsonl", task="t2i")]),
        dict(name="edit", weight=2, datasets=[dict(path="runs/toy/world/train/edit.jsonl", task="edit")]),
        dict(name="vqa", weight=1, datasets=[dict(path="runs/toy/world/train/vqa.jsonl", task="vqa")]),
        dict(
            name="perception",
            weight=1,
            datasets=[dict(path="runs/toy/world/train/perception.jsonl", task="perception")],
        ),
        dict(
            name="composition",
            weight=1,
            datasets=[dict(path="runs/toy/world/train/composition.jsonl", task="composition")],
        ),
    ],
)
max_steps = 800
