"""Named lists of (name, config) for run.py; see recipes.py for the config keys."""

base = [
    ("dense", {"dense": True}),
    ("wanda", {}),
    ("magnitude", {"attn_metric": "magnitude", "mlp": "magnitude"}),
]
