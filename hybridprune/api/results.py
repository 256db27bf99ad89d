"""What the API returns: one dataclass per command (and per evaluated model, per pruned point), each with
`to_dict()` for --json."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hybridprune.config import PruneConfig
from hybridprune.presets import Preset

if TYPE_CHECKING:
    from hybridprune.evaluation import PerplexityResult
    from hybridprune.models.loading import LoadedModel
    from hybridprune.sparsity import SparsityReport


@dataclass
class CalibrateResult:
    """One calibration entry in the cache (and the second-order entry with `hessians`)."""

    key: str
    reused: bool
    entry: Path
    bytes: int
    tokens: int
    layers: int
    seconds: float
    inputs: dict[str, Any]
    shard: str | None = None
    full_key: str | None = None
    shard_count: int | None = None
    hessians: dict[str, Any] | None = None
    leader: bool = True  # False on the non-zero ranks of torchrun, which print nothing

    def to_dict(self) -> dict[str, Any]:
        document = {
            "key": self.key, "reused": self.reused, "entry": str(self.entry), "bytes": self.bytes, "tokens": self.tokens,
            "layers": self.layers, "seconds": round(self.seconds, 2), "inputs": self.inputs,
        }
        if self.shard is not None:
            document.update(shard=self.shard, full_key=self.full_key)
        if self.hessians is not None:
            document["hessians"] = self.hessians
        return document


@dataclass
class ScoreResult:
    """Per-layer NeuronRank score summaries, and where the scores were cached."""

    statistics_key: str
    scoring: dict[str, Any]
    scores_file: Path
    sparsity: float
    layers: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"statistics_key": self.statistics_key, "scoring": self.scoring, "scores_file": str(self.scores_file),
                "layers": self.layers}


@dataclass
class PruneRun:
    """One pruned model (one point of a sweep)."""

    config: PruneConfig
    preset: str
    statistics_key: str
    statistics_reused: bool
    report: SparsityReport
    record: dict[str, Any]  # what hybridprune.json holds
    out: Path | None = None
    ppl: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**self.record, **({"ppl": self.ppl} if self.ppl is not None else {}),
                **({"out": str(self.out)} if self.out is not None else {}), "seconds": round(self.seconds, 2)}


@dataclass
class PruneResult:
    runs: list[PruneRun]
    preset: Preset | None
    dense_ppl: float | None = None
    plot: Path | None = None
    model: LoadedModel | None = None  # the last pruned model, in memory (None when it was streamed to disk)

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"runs": [run.to_dict() for run in self.runs]}
        if self.dense_ppl is not None:
            document["dense_ppl"] = self.dense_ppl
        return document


@dataclass
class Evaluation:
    """Everything measured on one model; the model itself is released once this exists."""

    role: str  # model | baseline | compare
    label: str  # what the user gave (or "embedded")
    folder: Path
    method: str  # from hybridprune.json, else "dense" or "unknown"
    target_sparsity: float | None
    windows: int
    seqlen: int
    result: PerplexityResult
    sparsity: SparsityReport
    parameters: int
    size_bytes: int
    latency_s: float | None  # prefill: median seconds of a batch-1 forward over seqlen tokens
    tasks: dict[str, dict[str, float]] | None
    decode_tokens_per_second: float | None = None  # greedy, batch 1, KV cache, 128 new tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "decode_tokens_per_second": self.decode_tokens_per_second,
            "role": self.role, "source": self.label, "folder": str(self.folder), "method": self.method,
            "target_sparsity": self.target_sparsity, "windows": self.windows, "seqlen": self.seqlen,
            "perplexity": self.result.to_dict(), "sparsity": self.sparsity.to_dict(), "parameters": self.parameters,
            "size_bytes": self.size_bytes, "latency_s": self.latency_s, "tasks": self.tasks,
        }


@dataclass
class EvalResult:
    protocol: dict[str, Any]
    evaluations: list[Evaluation]
    compare: bool
    plot: Path | None = None

    @property
    def model(self) -> Evaluation:
        return self.evaluations[0]

    @property
    def baseline(self) -> Evaluation | None:
        return next((e for e in self.evaluations if e.role == "baseline"), None)

    @property
    def dense_ppl(self) -> float | None:
        references = [e for e in self.evaluations if e.role == "baseline"] or [e for e in self.evaluations if e.method == "dense"]
        return references[0].result.ppl if references else None

    def delta(self) -> dict[str, Any] | None:
        """Model minus baseline, by name (never by position)."""
        base = self.baseline
        if base is None or self.compare:
            return None
        model = self.model
        return {
            "ppl": model.result.ppl - base.result.ppl,
            "ppl_relative": (model.result.ppl - base.result.ppl) / base.result.ppl,
            "nll": model.result.nll - base.result.nll,
            **{f"sparsity_{kind}": model.sparsity.kind(kind).sparsity - base.sparsity.kind(kind).sparsity for kind in ("attention", "mlp")},
            "sparsity": model.sparsity.total.sparsity - base.sparsity.total.sparsity,
            "parameters": model.parameters - base.parameters,
            "size_bytes": model.size_bytes - base.size_bytes,
            "throughput_ratio": model.result.tokens_per_second / base.result.tokens_per_second,
            "latency_s": None if model.latency_s is None or base.latency_s is None else model.latency_s - base.latency_s,
            "speedup": None if not model.latency_s or not base.latency_s else base.latency_s / model.latency_s,
            "decode_speedup": None if not model.decode_tokens_per_second or not base.decode_tokens_per_second
            else model.decode_tokens_per_second / base.decode_tokens_per_second,
        }

    def to_dict(self) -> dict[str, Any]:
        if self.compare:
            return {"protocol": self.protocol, "entries": [e.to_dict() for e in self.evaluations], "dense_ppl": self.dense_ppl,
                    "plot": str(self.plot) if self.plot else None}
        document: dict[str, Any] = {"protocol": self.protocol, "model": self.model.to_dict()}
        if self.baseline is not None:
            document["baseline"] = self.baseline.to_dict()
            document["delta"] = self.delta()
        return document
