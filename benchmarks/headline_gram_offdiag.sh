#!/bin/bash
# The headline rows the default of 84ecbf2 (2026-12-01) changed (--gram-offdiag 0.25 at 50% unstructured: Wanda + update,
# balanced, quality), on the BENCHMARK.md protocol as benchmarks/headline.sh runs them (2:4 rows unchanged).
# Reproduce: bash benchmarks/headline_gram_offdiag.sh   (writes runs/headline-gram-offdiag/eval.json)
set -e
cd "$(dirname "$0")/.."
H=".venv/bin/hybridprune"
R=runs/headline-gram-offdiag
mkdir -p $R
run() { name=$1; shift; $H prune "$@" --out $R/$name --overwrite --quiet --json > $R/$name.json; echo "$name done $(date +%T)"; }
run wanda-update --preset wanda --update --sparsity 0.5 --data wiki-vital
run balanced --sparsity 0.5 --data wiki-vital
run quality --preset quality --sparsity 0.5 --data wiki-vital
ROWS="wanda-update balanced quality"
$H eval --baseline embedded --compare $(for r in $ROWS; do echo $R/$r; done) --windows 64 --json --quiet > $R/eval.json
echo "eval done $(date +%T)"
