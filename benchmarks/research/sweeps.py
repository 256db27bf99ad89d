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

OUTM = {"mlp": "neuron", "neuron": {**OUT, "gu": "matrix", "sexp": 1.0, "down": "row"}}
s4 = [
    ("out_matrix+owl0.05", {**OUTM, "layer": {"score": "owl", "M": 5, "spread": 0.05}}),
    ("out_matrix+v_out1", {**OUTM, "v_out": 1.0}),
]

BEST_MLP = OUTM
s5 = [
    ("out_matrix+qk+0.1", {**BEST_MLP, "kind_shift": {"q_proj": 0.1, "k_proj": 0.1}}),
    ("out_matrix+down-0.1", {**BEST_MLP, "kind_shift": {"down_proj": -0.1}}),
    ("out_matrix+down+0.1", {**BEST_MLP, "kind_shift": {"down_proj": 0.1}}),
    ("out_matrix+qk-0.1", {**BEST_MLP, "kind_shift": {"q_proj": -0.1, "k_proj": -0.1}}),
]

s6 = [
    ("wanda_2:4", {"pattern": "2:4"}),
    ("hybrid_2:4_down_out", {"pattern": "2:4", "mlp": "neuron", "neuron": {**OUT, "down": "row_s", "down_exp": 1.0}}),
    ("struct25_out_meanabs", {"structured": 0.25, "neuron": {"score": "out", "tf": "mean_abs"}}),
    ("struct25_out_rms", {"structured": 0.25, "neuron": {"score": "out", "tf": "rms"}}),
    ("struct25_tfidf_doc", {"structured": 0.25, "neuron": {"score": "tfidf", "tf": "rms", "idf": "doc", "idf_exp": 1.0}}),
    ("struct25_tf_rms", {"structured": 0.25, "neuron": {"score": "tf", "tf": "rms"}}),
    ("struct25_sens", {"structured": 0.25, "neuron": {"score": "sens"}}),
    ("struct50_out_rms", {"structured": 0.5, "neuron": {"score": "out", "tf": "rms"}}),
    ("struct50_tfidf_doc", {"structured": 0.5, "neuron": {"score": "tfidf", "tf": "rms", "idf": "doc", "idf_exp": 1.0}}),
]

def _oi(**kw):
    return {"mlp": "neuron", "neuron": {"score": "out_idf", "tf": "rms", "gu": "matrix", "sexp": 1.0, "down": "row", **kw}}

s7 = [  # knob sweep at 8 windows
    ("wanda", {}),
    ("out_matrix", OUTM),
    ("out_matrix_meanabs", {"mlp": "neuron", "neuron": {**OUT, "tf": "mean_abs", "gu": "matrix", "sexp": 1.0, "down": "row"}}),
    ("outidf_doc_g1", _oi(idf="doc", idf_exp=1.0)),
    ("outidf_doc_m51_g1", _oi(idf="doc", idf_exp=1.0, min_tokens=51)),
    ("outidf_doc_m51_g0.5", _oi(idf="doc", idf_exp=0.5, min_tokens=51)),
    ("outidf_topic_g1", _oi(idf="topic", idf_exp=1.0, min_rate=0.1)),
    ("outidf_old_g1", _oi(idf="old", idf_exp=1.0)),
    ("outidf_topic_g-0.5", _oi(idf="topic", idf_exp=-0.5, min_rate=0.1)),
]

# reduced lists (the machine was heavily shared; see FINDINGS.md)
s5r = [s5[0]]
s7r = [c for c in s7 if c[0] in ("out_matrix", "outidf_doc_m51_g1", "outidf_topic_g1", "outidf_old_g1")]
s6r = [c for c in s6 if c[0] in ("wanda_2:4", "hybrid_2:4_down_out", "struct25_out_meanabs", "struct25_tfidf_doc", "struct50_out_rms")]
fin = [("wanda", {}), ("out_matrix", OUTM)]
fin_mag = [("magnitude", {"attn_metric": "magnitude", "mlp": "magnitude"})]
ref8 = [("wanda", {}), ("outidf_topic_g-0.5", s7[-1][1])]
st2 = [c for c in s6 if c[0] in ("struct25_out_rms", "struct50_tfidf_doc")] + [("dense", {"dense": True})]
qk = [("out_matrix+qk+0.2", {**BEST_MLP, "kind_shift": {"q_proj": 0.2, "k_proj": 0.2}})]
fin2 = [("out_matrix+qk+0.1", {**BEST_MLP, "kind_shift": {"q_proj": 0.1, "k_proj": 0.1}})]
