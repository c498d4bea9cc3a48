# Debug size: the tiny transformer on the coloured-shapes world, fp32 on CPU in well under a minute, through the
# same trainer, data and DeepSpeed code as the stages. Build its inputs first:
#   python scripts/make_debug_assets.py && bash train_unialignment.sh configs/debug.py
_base_ = ["_base_/model.py", "_base_/components.py", "_base_/data.py", "_base_/schedule.py", "_base_/deepspeed.py"]

work_dir = "runs/debug"
# unialignment.toy.transformer.TINY_UNIALIGNMENT_CONFIG, with the widths of the tiny frozen components.
model = dict(
    load_from=None,
    config=dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,  # the tiny VAE's latent_channels
        out_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,  # the tiny T5's d_model
        caption_projection_dim=16,
        pooled_projection_dim=6,
        pos_embed_max_size=16,
        # vocab_size is left out: a fresh model's text head takes len(tokenizer), which depends on the
        # sentencepiece version that trained the tiny tokenizer.
        teacher_dim=32,  # the tiny teacher's vision out_hidden_size
        alignment_hidden_dim=20,
        num_null_image_tokens=3,
        align_depth=2,
    ),
)
speed = dict(gradient_checkpointing=False)
components = dict(
    sd3=None,
    tokenizer="runs/debug_assets/components/tokenizer",
    text_encoder="runs/debug_assets/components/text_encoder",
    vae="runs/debug_assets/components/vae",
    teacher="runs/debug_assets/components/teacher",
    text_length=32,
    dtype="float32",
)
data = dict(
    groups=[
        dict(name="t2i", weight=1, datasets=[dict(path="runs/debug_assets/data/t2i.jsonl", task="t2i")]),
        dict(name="edit", weight=1, datasets=[dict(path="runs/debug_assets/data/edit.jsonl", task="edit")]),
    ],
    resolution=32,
    num_workers=0,
)
batch = dict(global_batch_size=8, micro_batch_size=2)
optimizer = dict(lr=1e-3, warmup_steps=5)
max_steps = 40
ema_decay = 0.99
deepspeed = dict(zero_stage=2, precision="fp32")
checkpoint = dict(every_steps=20, keep_last=2)
logging = dict(
    every_steps=5,
    sample_every_steps=20,
    sample_prompts=["a red square on the left", "a blue circle in the middle"],
    sample_edits=[
        dict(image="runs/debug_assets/data/images/red_square_left.png", instruction="Make the square green.")
    ],
    caption_images=["runs/debug_assets/data/images/blue_circle_middle.png"],
    sample_steps=8,
    caption_steps=8,
    guidance_scale=3.0,
)
