# Task groups: each optimizer step takes one group; "alternate" with equal weights is the reference's 1:1.
data = dict(
    groups=[
        dict(name="t2i", weight=1, datasets=[dict(path="data/t2i.jsonl", task="t2i")]),
    ],
    resolution=512,
    aspect_ratio_buckets=False,
    schedule="alternate",
    num_workers=4,
    max_bad_fraction=0.01,
    use_feature_cache=False,
)
