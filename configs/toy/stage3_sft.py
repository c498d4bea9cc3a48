# Toy stage 3: every task, question answering added; from stage 2's EMA weights.
_base_ = ["_base_/toy_world.py"]

work_dir = "runs/toy/aligned/stage3_sft"
model = dict(load_from="runs/toy/aligned/stage2_multitask/export/ema")
data = dict(
    groups=[
        dict(name="t2i", weight=1, datasets=[dict(path="runs/toy/world/train/t2i.jsonl", task="t2i")]),
        dict(
            name="edit",
            weight=1,
            datasets=[
                dict(path="runs/toy/world/train/edit.jsonl", task="edit"),
                dict(path="runs/toy/world/train/perception.jsonl", task="perception"),
            ],
        ),
        dict(
            name="composition",
            weight=1,
            datasets=[dict(path="runs/toy/world/train/composition.jsonl", task="composition")],
        ),
        dict(name="vqa", weight=1, datasets=[dict(path="runs/toy/world/train/vqa.jsonl", task="vqa")]),
    ],
)
optimizer = dict(warmup_steps=20)
max_steps = 150
