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

s2 = [
    ("nr_out_matrix_sexp1", {"mlp": "neuron", "neuron": {**OUT, "gu": "matrix", "sexp": 1.0, "down": "row"}}),
    ("nr_out_matrix_sexp0.5", {"mlp": "neuron", "neuron": {**OUT, "gu": "matrix", "sexp": 0.5, "down": "row"}}),
    ("nr_out_alloc0.3_downrow", {"mlp": "neuron", "neuron": {**OUT, "gu": "alloc", "spread": 0.3, "down": "row"}}),
    ("nr_out_alloc0.2_downrow_s0.5", {"mlp": "neuron", "neuron": {**OUT, "gu": "alloc", "spread": 0.2, "down": "row_s", "down_exp": 0.5}}),
    ("nr_tf_alloc0.2", {"mlp": "neuron", "neuron": {"score": "tf", "tf": "rms", "gu": "alloc", "spread": 0.2, "down": "row"}}),
]

SENS = {"score": "sens"}
s3 = [
    ("nr_sens_matrix_sexp1", {"mlp": "neuron", "neuron": {**SENS, "gu": "matrix", "sexp": 1.0, "down": "row"}}),
    ("nr_out_matrix_sexp1.5", {"mlp": "neuron", "neuron": {**OUT, "gu": "matrix", "sexp": 1.5, "down": "row"}}),
    ("nr_sens_matrix_owl", {"mlp": "neuron", "layer": {"score": "owl", "M": 5, "spread": 0.05}, "neuron": {**SENS, "gu": "matrix", "sexp": 1.0, "down": "row"}}),
    ("nr_sens_alloc0.2", {"mlp": "neuron", "neuron": {**SENS, "gu": "alloc", "spread": 0.2, "down": "row"}}),
]

s4 = [
    ("nr_sens_matrix+v_out1", {"v_out": 1.0, "mlp": "neuron", "neuron": {**SENS, "gu": "matrix", "sexp": 1.0, "down": "row"}}),
]

BEST_MLP = {"mlp": "neuron", "neuron": {**SENS, "gu": "matrix", "sexp": 1.0, "down": "row"}}
s5 = [
    ("sens_matrix+qk+0.1", {**BEST_MLP, "kind_shift": {"q_proj": 0.1, "k_proj": 0.1}}),
    ("sens_matrix+down-0.1", {**BEST_MLP, "kind_shift": {"down_proj": -0.1}}),
    ("sens_matrix+down+0.1", {**BEST_MLP, "kind_shift": {"down_proj": 0.1}}),
    ("sens_matrix+qk-0.1", {**BEST_MLP, "kind_shift": {"q_proj": -0.1, "k_proj": -0.1}}),
]
