# Fine-tune the authors' released UniAlignment pipeline folder (or one exported by this trainer) on your own data:
# the transformer starts from its weights, and its tokenizer, T5, VAE and learned mask embedding are the frozen
# components. The release holds no alignment teacher: add components.teacher=<Qwen2.5-VL-7B-Instruct folder> to keep
# the intrinsic-modal alignment loss (without it that term is off; the contrastive term stays).
#   bash train_unialignment.sh configs/finetune_released.py --model.load_from DIR --components.sd3 DIR \
#       --data.groups "[...]"
_base_ = ["_base_/model.py", "_base_/components.py", "_base_/data.py", "_base_/schedule.py", "_base_/deepspeed.py"]

work_dir = "runs/finetune"
model = dict(load_from="checkpoints/UniAlignment")
components = dict(sd3="checkpoints/UniAlignment", teacher=None)
optimizer = dict(warmup_steps=500)
max_steps = 10_000
checkpoint = dict(every_steps=1000)
