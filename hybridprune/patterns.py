"""Sparsity patterns as text ("unstructured", "structured", "N:M"): parsed without torch, so that
validating a configuration or a preset never imports the heavy stack."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

PatternKind = Literal["unstructured", "nm", "structured"]

_N_M_TEXT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern; for ``nm``, n weights are pruned in each block of m inputs."""

    kind: PatternKind
    n: int = 0
    m: int = 0

    def __post_init__(self) -> None:
        if self.kind == "nm":
            if not 0 < self.n < self.m:
                raise ValueError(
                    f"invalid N:M pattern {self.n}:{self.m}: need 0 < N < M "
                    "(N weights pruned in each block of M inputs, e.g. 2:4)"
                )
        elif self.kind in ("unstructured", "structured"):
            if self.n or self.m:
                raise ValueError(f"pattern {self.kind!r} takes no N or M")
        else:
            raise ValueError(f"unknown pattern kind {self.kind!r}")

    @property
    def sparsity(self) -> float | None:
        """The sparsity the pattern fixes by itself (N/M), or None when the target decides."""
        return self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind


def parse_pattern(text: str) -> Pattern:
    """Read "unstructured", "structured" or "N:M" (N pruned per M, 0 < N < M)."""
    cleaned = text.strip().lower()
    if cleaned in ("unstructured", "structured"):
        return Pattern(kind=cleaned)  # type: ignore[arg-type]
    match = _N_M_TEXT.match(cleaned)
    if match is None:
        raise ValueError(
            f"invalid pattern {text!r}: use 'unstructured', 'structured' or N:M such as 2:4 or 4:8"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(
            f"invalid pattern {text!r}: need 0 < N < M (N weights pruned in each block of M, e.g. 2:4)"
        )
    return Pattern(kind="nm", n=n, m=m)
