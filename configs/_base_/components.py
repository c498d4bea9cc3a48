# Frozen components, loaded from local folders (no hub access). `sd3` is the stable-diffusion-3-medium-diffusers
# folder: its tokenizer_3, text_encoder_3 and vae are used. The teacher is Qwen2.5-VL-7B-Instruct.
components = dict(
    sd3="checkpoints/stable-diffusion-3-medium-diffusers",
    teacher="checkpoints/Qwen2.5-VL-7B-Instruct",
    mask_embedding=None,
    text_length=256,
    dtype="bfloat16",
)
