"""Research: does calibrating on mixed text (not only wiki) keep the hybrid ahead of Wanda off-domain?

Calibration = 16 windows of wiki-vital's calibration split + 8 of Python source that is NOT the stdlib
(the installed `click` package, sorted files) + 8 of Shakespeare's five poems (not the plays, not Milton),
32 x 512 in all, seeded. None of these texts is in a validation or test half of benchmarks/domains.py.
Wanda and every configuration use these same statistics; ratios are against that Wanda.

Usage (repo root): PYTHONPATH=. python benchmarks/research/mixed_calibration.py CONFIG [CONFIG ...]
Rows: benchmarks/research/mixed_calibration.jsonl (validation halves, SmolLM2).
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import domains  # noqa: E402
import validate  # noqa: E402

from hybridprune.data import sample_windows  # noqa: E402
from hybridprune.data.tokens import encode_text  # noqa: E402

OUT = Path(__file__).with_name("mixed_calibration.jsonl")
HALF = sys.argv[-1] if sys.argv[-1] in ("validation", "test") else "validation"


def mixed_texts() -> dict[str, str]:
    import click

    from hybridprune.data import load_text

    code = "\n\n".join(domains._clean(p.read_text()) for p in sorted(Path(click.__file__).parent.glob("*.py")))
    members = domains._sdist_members()
    poems = "\n\n".join(domains._clean(members[n]) for n in sorted(members) if n.rsplit("/", 1)[1] in domains._POEMS)
    return {"wiki": load_text("wiki-vital", "calibration").text, "code": code, "verse": poems}


class MixedBench(validate.Bench):
    def _file(self, what: str, seed: int):
        return validate.CACHE / f"{self.name}-mixed-{what}-{self.spec['nsamples']}x{self.spec['seqlen']}-s{seed}.safetensors"

    def calibration_windows(self, seed: int) -> torch.Tensor:
        seqlen = self.spec["seqlen"]
        parts = []
        for (name, text), count in zip(mixed_texts().items(), (16, 8, 8)):
            ids = encode_text(text, self.loaded.tokenizer)
            parts.append(sample_windows(ids, count, seqlen, seed))
        return torch.cat(parts)


def main() -> None:
    names = [n for n in sys.argv[1:] if n not in ("validation", "test")]
    bench = MixedBench("smollm2", 2)
    known = validate.configs()
    for name in names:
        config = None if name == "dense" else known[name]
        t = time.time()
        bench.apply(config, 0)
        prune_s = time.time() - t
        for domain in validate.DOMAINS:
            ppl = bench.ppl(domain, HALF)
            row = dict(config=name, domain=domain, half=HALF, ppl=round(ppl, 4), prune_s=round(prune_s, 1))
            with OUT.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row, flush=True)


if __name__ == "__main__":
    main()
