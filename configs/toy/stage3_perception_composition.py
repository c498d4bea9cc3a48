# Toy stage 3 of `--full` only: perception maps and compositions, with edits and text-to-image replayed so they are
# kept; from stage 2's EMA weights. The default demo leaves these two tasks out (see stage2_multitask.py).
_base_ = ["_base_/toy_world.py"]

work_dir = "runs/toy/aligned/stage3_perception_composition"
model = dict(load_from="runs/toy/aligned/stage2_multitask/export/ema")
data = dict(
    groups=[
        dict(
            name="perception",
            weight=2,
            datasets=[dict(path="runs/toy/world/train/perception.jsonl", task="perception")],
        ),
        dict(
            name="composition",
            weight=2,
            datasets=[dict(path="runs/toy/world/train/composition.jsonl", task="composition")],
        ),
        dict(name="edit", weight=1, datasets=[dict(path="runs/toy/world/train/edit.jsonl", task="edit")]),
        dict(name="t2i", weight=1, datasets=[dict(path="runs/toy/world/train/t2i.jsonl", task="t2i")]),
    ],
)
optimizer = dict(warmup_steps=20)
# Like editing, a map or a composition copies its sources place by place: stage 2's low-noise timestep density.
objective = dict(logit_mean=-0.5)
max_steps = 3000
