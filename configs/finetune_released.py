# Fine-tune the authors' released UniAlignment pipeline folder on your own data.
_base_ = ["_base_/model.py", "_base_/components.py", "_base_/data.py", "_base_/schedule.py", "_base_/deepspeed.py"]

work_dir = "runs/finetune"
model = dict(load_from="checkpoints/UniAlignment")
components = dict(sd3="checkpoints/UniAlignment", mask_embedding="checkpoints/UniAlignment/mask_token_emb.00-of-01.pth")
optimizer = dict(warmup_steps=500)
max_steps = 10_000
checkpoint = dict(every_steps=1000)
