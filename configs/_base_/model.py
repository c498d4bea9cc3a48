# The trainable transformer. Stage 1 loads SD3-medium's transformer; later stages load the previous stage's export.
model = dict(
    load_from=None,
    config=dict(),  # transformer config overrides; empty = the SD3-medium / released layout
    gradient_checkpointing=True,
    lora_rank=0,
)
