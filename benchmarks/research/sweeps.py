"""Named lists of (name, config) for run.py; see recipes.py for the config keys."""

base = [
    ("dense", {"dense": True}),
    ("wanda", {}),
    ("magnitude", {"attn_metric": "magnitude", "mlp": "magnitude"}),
]

OUT = {"score": "out", "tf": "rms"}
s1 = [
    ("nr_out_alloc0.1_downrow", {"mlp": "neuron", "neuron": {**OUT, "gu": "alloc", "spread": 0.1, "down": "row"}}),
    ("nr_out_alloc0.1_downcol", {"mlp": "neuron", "neuron": {**OUT, "gu": "alloc", "spread": 0.1, "down": "col"}}),
    ("attn_share-0.1", {"attn_share": -0.1}),
    ("attn_share+0.1", {"attn_share": 0.1}),
    ("owl_M5_0.05", {"layer": {"score": "owl", "M": 5, "spread": 0.05}}),
    ("ria_all", {"attn_metric": "ria", "mlp": "ria"}),
    ("nr_out_alloc0.2_downrow", {"mlp": "neuron", "neuron": {**OUT, "gu": "alloc", "spread": 0.2, "down": "row"}}),
    ("nr_tfidf_doc_alloc0.1", {"mlp": "neuron", "neuron": {"score": "tfidf", "tf": "rms", "idf": "doc", "idf_exp": 1.0, "gu": "alloc", "spread": 0.1, "down": "row"}}),
]
