# The built-in small default (issue: a shapes world on which the whole system visibly learns on 2 CPU cores).
# scripts/toy_demo.py fills in the data and component folders it builds, and the image size of the data;
# the paths below are where it puts them by default, so a stage can also be launched by hand:
#   bash train_unialignment.sh configs/toy/stage1_t2i_caption.py
_base_ = [
    "../../_base_/model.py",
    "../../_base_/components.py",
    "../../_base_/data.py",
    "../../_base_/schedule.py",
    "../../_base_/deepspeed.py",
]

# 64 px images -> the tiny VAE's 4x downsampling -> 16 x 16 latents -> patch 2 -> 64 image tokens.
model = dict(
    load_from=None,
    config=dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,  # the tiny VAE's latent_channels
        out_channels=4,
        num_layers=4,
        # 8 heads x 16 = 128 wide at batch 16. Against 4 x 32, after stage 1 and 1000 edit-only steps: held-out
        # recolour 0.44-0.52 against 0.31 (more heads, more chances to find the place-by-place copy an edit needs).
        attention_head_dim=16,
        num_attention_heads=8,
        # RMS-normed queries and keys (SD3.5's choice) keep attention logits bounded at this learning rate: stage 1
        # reached held-out t2i colour 0.79 and shape 0.54 at lr 2e-3, against 0.50 and 0.46 without, at 1e-3.
        qk_norm="rms_norm",
        joint_attention_dim=32,  # the tiny T5's d_model
        caption_projection_dim=128,
        pooled_projection_dim=6,
        pos_embed_max_size=16,
        # vocab_size is left out: a fresh model's text head takes len(tokenizer) of the world's tokenizer.
        teacher_dim=32,  # the tiny teacher's vision out_hidden_size
        alignment_hidden_dim=64,
        num_null_image_tokens=4,
        align_depth=2,
        # Beyond the reference (unialignment.models.transformer): a sin-cos table tells the text stream where each
        # text position is. Without it an all-mask caption gives every position the same state and captions come
        # out rotated ("middle a small red triangle in the"). In a text-stream-only run at 600 steps it lowered the
        # text loss from 0.58 to 0.35 and every caption became a sentence; 17/24 held-out captions were right
        # after 1800 steps.
        text_position_embedding=True,
        # Beyond the reference: SD3's image position table (scale 1) on an 8 x 8 token grid puts neighbours at
        # cosine 0.996, so an edit's target tokens can hardly find the source token at their own place. Spreading
        # the positions 16x (neighbours at 0.80) took held-out recolour from 0.21-0.23 to 0.50 after stage 1 and
        # 1000 edit-only steps, with the loss at sigma 0.9 given the source 0.05 against 0.12.
        interpolation_scale=1 / 16,
    ),
)
speed = dict(gradient_checkpointing=False)
components = dict(
    sd3=None,
    tokenizer="runs/toy/components/tokenizer",
    text_encoder="runs/toy/components/text_encoder",
    vae="runs/toy/components/vae",
    teacher="runs/toy/components/teacher",
    # The longest toy text (a two-object caption) is 16 tokens with </s>. Little padding matters here: the text
    # stream sees no absolute positions (T5 is relative-position only), so padding `</s>` tokens dominate what a
    # young model predicts at every masked position.
    text_length=16,
    dtype="float32",
)
data = dict(resolution=64, num_workers=0, max_bad_fraction=0.0)
batch = dict(global_batch_size=16, micro_batch_size=16)
# A short run ends best at a small learning rate: with cosine decay to a tenth, 1000 edit-only steps reached held-out
# recolour 0.65, against 0.48 at the constant 3e-3 and 0.50 at 2e-3.
optimizer = dict(
    lr=3e-3, weight_decay=0.01, warmup_steps=50, lr_schedule="cosine", min_lr_ratio=0.1, clip_grad_norm=1.0
)
ema_decay = 0.99
# Text weight 1.0 (reference 0.2): at this scale captions are learned far more slowly than images, and the
# caption row of the demo's table is one of its goals. The alignment weights stay the reference's.
objective = dict(weights=dict(text=1.0))
deepspeed = dict(zero_stage=2, precision="fp32")  # CPU: no bf16 kernels worth having at this size
checkpoint = dict(every_steps=1000, keep_last=1)
logging = dict(
    every_steps=25,
    sample_every_steps=1000,
    sample_prompts=["a large red square on the left", "a small blue circle in the middle"],
    caption_images=[],
    sample_steps=20,
    caption_steps=16,
    guidance_scale=3.0,  # as the demo samples (scripts/toy_demo.py --guidance)
)
