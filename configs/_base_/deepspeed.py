# ZeRO-2 by default (ZeRO-1 and ZeRO-3 selectable; optional CPU offload); bf16 compute, fp32 master weights.
# ZeRO reduces gradients in buckets overlapped with backward; `gradient_communication="bf16"` halves that traffic
# (the sums are rounded to bf16) for clusters whose interconnect is the bottleneck.
deepspeed = dict(
    zero_stage=2,
    offload_optimizer=False,
    offload_param=False,
    precision="bf16",
    overlap_comm=True,
    reduce_bucket_size=500_000_000,
    allgather_bucket_size=500_000_000,
    gradient_communication="fp32",
)
