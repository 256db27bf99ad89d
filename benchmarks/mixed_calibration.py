"""Research: does calibrating on mixed text (not only wiki) keep the hybrid ahead of Wanda off-domain?

Calibration = 16 windows of wiki-vital's calibration split + 8 of Python source that is NOT the stdlib
(the installed `click` package, sorted files) + 8 of Shakespeare's five poems (not the plays, not Milton),
32 x 512 in all, seeded. None of these texts is in a validation or test half of benchmarks/domains.py.
Wanda and every configuration use these same statistics; ratios are against that Wanda.

MIX=wc (environment): 24 windows of wiki-vital + 8 of Python source from the stdlib's sub-packages
(`<stdlib>/<package>/**/*.py`, tests and idlelib left out; the `code` domain uses only top-level modules,
so the files are disjoint; the same interpreter, so code is "near domain"), no verse: what a product
default can ship, since the stdlib is on every machine. Plays, poetry and docs stay unseen.

Usage (repo root): [MIX=wc] PYTHONPATH=. python benchmarks/mixed_calibration.py CONFIG [CONFIG ...]
Rows: benchmarks/mixed_calibration.jsonl (validation halves, SmolLM2; field "mix").
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import domains  # noqa: E402
import validate  # noqa: E402

from hybridprune.data import sample_windows  # noqa: E402
from hybridprune.data.tokens import encode_text  # noqa: E402

OUT = Path(__file__).with_name("mixed_calibration.jsonl")
MIX = __import__("os").environ.get("MIX", "wcv")
HALF = sys.argv[-1] if sys.argv[-1] in ("validation", "test") else "validation"


def stdlib_package_code() -> str:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    files = sorted(p for p in stdlib.glob("*/**/*.py")
                   if not skip.intersection(p.relative_to(stdlib).parts) and "test" not in p.name)
    return "\n\n".join(domains._clean(p.read_text(encoding="utf-8", errors="replace")) for p in files)


def mixed_texts() -> dict[str, str]:
    import click

    from hybridprune.data import load_text

    code = "\n\n".join(domains._clean(p.read_text()) for p in sorted(Path(click.__file__).parent.glob("*.py")))
    members = domains._sdist_members()
    poems = "\n\n".join(domains._clean(members[n]) for n in sorted(members) if n.rsplit("/", 1)[1] in domains._POEMS)
    return {"wiki": load_text("wiki-vital", "calibration").text, "code": code, "verse": poems}


class MixedBench(validate.Bench):
    def _file(self, what: str, seed: int):
        return validate.CACHE / f"{self.name}-mixed{'' if MIX == 'wcv' else '-' + MIX}-{what}-{self.spec['nsamples']}x{self.spec['seqlen']}-s{seed}.safetensors"

    def calibration_windows(self, seed: int) -> torch.Tensor:
        seqlen = self.spec["seqlen"]
        parts = []
        if MIX == "wc":
            from hybridprune.data import load_text

            sources = {"wiki": (load_text("wiki-vital", "calibration").text, 24), "code": (stdlib_package_code(), 8)}
        else:
            sources = {name: (text, count) for (name, text), count in zip(mixed_texts().items(), (16, 8, 8))}
        for _name, (text, count) in sources.items():
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
            row = dict(mix=MIX, config=name, domain=domain, half=HALF, ppl=round(ppl, 4), prune_s=round(prune_s, 1))
            with OUT.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(row, flush=True)


if __name__ == "__main__":
    main()
