# Reference settings (docs/METHOD.md section 6): AdamW 3e-5, weight decay 0.01, 2000 warm-up steps then constant,
# clip 2.0, global batch 384 in micro-batches of 4, 80k steps, EMA 0.9995, a checkpoint every 5000 steps.
optimizer = dict(
    lr=3e-5, weight_decay=0.01, betas=(0.9, 0.999), warmup_steps=2000, lr_schedule="constant", clip_grad_norm=2.0
)
batch = dict(global_batch_size=384, micro_batch_size=4)
max_steps = 80_000
ema_decay = 0.9995
seed = 0
checkpoint = dict(every_steps=5000, keep_last=3, export=True)
logging = dict(every_steps=10, sample_every_steps=1000)
objective = dict(
    weights=dict(image=1.0, text=0.2, contrastive=0.05, align_image=0.1, align_text=0.1),
    weighting_scheme="logit_normal",
    condition_dropout=0.1,
)
