# Toy stage 2: add editing, perception and composition; from stage 1's EMA weights.
_base_ = ["_base_/toy_world.py"]

work_dir = "runs/toy/aligned/stage2_multitask"
model = dict(load_from="runs/toy/aligned/stage1_t2i_caption/export/ema")
data = dict(
    groups=[
        dict(name="t2i", weight=1, datasets=[dict(path="runs/toy/world/train/t2i.jsonl", task="t2i")]),
        dict(
            name="edit",
            weight=2,  # editing is the task this stage adds and the hardest to learn: half of its steps
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
    ],
)
optimizer = dict(warmup_steps=20)
max_steps = 500
