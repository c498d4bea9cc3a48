# ZeRO-2 by default (ZeRO-1 and ZeRO-3 selectable; optional CPU offload); bf16 compute, fp32 master weights.
deepspeed = dict(zero_stage=2, offload_optimizer=False, offload_param=False, precision="bf16")
