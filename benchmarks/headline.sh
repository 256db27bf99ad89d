#!/bin/bash
# Headline rows on the BENCHMARK.md protocol (test split, 64 x 512; calibration 32 x 512) with the new defaults.
# Reproduce: bash benchmarks/headline.sh   (about 15 minutes here; writes runs/headline/eval.json)
set -e
cd "$(dirname "$0")/.."
H=".venv/bin/hybridprune"
R=runs/headline
mkdir -p $R
run() { name=$1; shift; $H prune "$@" --out $R/$name --overwrite --quiet --json > $R/$name.json; echo "$name done $(date +%T)"; }
run wanda --prune-method wanda --sparsity 0.5
run balanced --sparsity 0.5
run quality --preset quality --sparsity 0.5
run wanda-update --prune-method wanda --update --sparsity 0.5
run quality-sweep --preset quality --update-mask sweep --update-shrink 1 --sparsity 0.5
run hybrid24 --pattern 2:4 --sparsity 0.5
run hybrid24-update --pattern 2:4 --sparsity 0.5 --update
run wanda24 --prune-method wanda --pattern 2:4 --sparsity 0.5
run compressed --sparsity 0.5 --save-format compressed
$H eval --baseline embedded --compare $R/wanda $R/balanced $R/quality $R/wanda-update $R/quality-sweep $R/hybrid24 $R/hybrid24-update $R/wanda24 $R/compressed --windows 64 --plot $R/compare.png --json --quiet > $R/eval.json
echo "eval done $(date +%T)"
