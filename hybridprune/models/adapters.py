"""One adapter per model family: where the decoder layers and their projections live.

Family differences are data here (attribute paths and module names), never
`if "llama" in name` checks scattered through the code.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from hybridprune.errors import UserError

INPUT_GROUPS = ("attn_in", "o_in", "mlp_in", "down_in")
"""The input groups of a decoder layer, defined once: Linears that read the same input share its
statistics (q/k/v read attn_in, o reads o_in, gate/up read mlp_in, down reads down_in)."""
ATTN_IN, O_IN, MLP_IN, DOWN_IN = INPUT_GROUPS


@dataclass(frozen=True)
class FamilyAdapter:
    """How to find the prunable parts of one decoder-only family."""

    family: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    attention_path: str = "self_attn"
    mlp_path: str = "mlp"
    attention_inputs: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    attention_output: str = "o_proj"
    mlp_inputs: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_output: str = "down_proj"
    intermediate_size_key: str = "intermediate_size"

    def base_model(self, model: nn.Module) -> nn.Module:
        """The transformer trunk without the LM head (calibration needs no logits)."""
        return _get_path(model, self.layers_path.rsplit(".", 1)[0])

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get_path(model, self.layers_path)

    def attention(self, layer: nn.Module) -> nn.Module:
        return _get_path(layer, self.attention_path)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return _get_path(layer, self.mlp_path)

    def linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """All prunable Linears of a layer, keyed by their short name (q_proj ... down_proj)."""
        attention, mlp = self.attention(layer), self.mlp(layer)
        found = {name: getattr(attention, name) for name in (*self.attention_inputs, self.attention_output)}
        found.update({name: getattr(mlp, name) for name in (*self.mlp_inputs, self.mlp_output)})
        return found

    def input_group(self, name: str) -> str:
        """The statistics group holding the squared input norms of Linear `name` (calibration/stats.py)."""
        if name in self.attention_inputs:
            return ATTN_IN
        if name == self.attention_output:
            return O_IN
        if name in self.mlp_inputs:
            return MLP_IN
        if name == self.mlp_output:
            return DOWN_IN
        raise KeyError(name)

    def group_readers(self) -> dict[str, str]:
        """One Linear per input group (the first that reads it): where calibration hooks its statistics."""
        return {self.attention_inputs[0]: ATTN_IN, self.attention_output: O_IN, self.mlp_inputs[0]: MLP_IN, self.mlp_output: DOWN_IN}

    @property
    def writers(self) -> tuple[str, str]:
        """The Linears whose outputs are added to the residual stream (o_proj, down_proj)."""
        return (self.attention_output, self.mlp_output)

    @property
    def attention_names(self) -> tuple[str, ...]:
        return (*self.attention_inputs, self.attention_output)

    @property
    def mlp_names(self) -> tuple[str, ...]:
        return (*self.mlp_inputs, self.mlp_output)


def _get_path(root: nn.Module, path: str) -> nn.Module:
    node = root
    for part in path.split("."):
        node = getattr(node, part)
    return node


ADAPTERS: tuple[FamilyAdapter, ...] = (
    FamilyAdapter("LLaMA", ("llama",)),
    FamilyAdapter("Mistral", ("mistral",)),
    FamilyAdapter("Qwen2/Qwen3", ("qwen2", "qwen3")),
    FamilyAdapter("Gemma-2/3", ("gemma2", "gemma3_text")),
)


def supported_families() -> str:
    return ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)


def adapter_for(model_type: str) -> FamilyAdapter:
    """The adapter for a config's `model_type`; unsupported families are refused by name."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise UserError(
        f"unsupported architecture '{model_type}': hybridprune supports {supported_families()}"
    )
