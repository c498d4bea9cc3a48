# The trainable transformer. Stage 1 loads SD3-medium's transformer; later stages load the previous stage's export.
model = dict(
    load_from=None,
    config=dict(),  # transformer config overrides; empty = the SD3-medium / released layout
    lora_rank=0,
)
# How the step is computed (never what): each switch is tested equal to the plain path; see BENCHMARKS.md for what
# each one gains on a GPU. Activation checkpointing: False, True (every block) or k (every k-th block).
speed = dict(
    gradient_checkpointing=True,
    compile_blocks=False,
    fuse_t2i_passes=False,
    masked_text_loss=False,
    prefetch=False,
    uint8_pixels=False,
    teacher_inputs_in_workers=False,
    compile_text_encoder=False,
    pad_narrow_heads=False,
)
