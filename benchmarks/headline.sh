#!/bin/bash
# Headline rows on the BENCHMARK.md protocol (wiki-vital test split, 64 x 512; calibration 32 x 512 of the
# wiki-vital calibration split, hence --data wiki-vital: the product's default calibration text is now
# wiki-vital+code) with the presets as they are.
# Reproduce: bash benchmarks/headline.sh   (about 30 minutes here on 1 thread; writes runs/headline/eval.json;
#   each NAME.json holds the run's summary, including its prune time)
set -e
cd "$(dirname "$0")/.."
H=".venv/bin/hybridprune"
R=runs/headline
mkdir -p $R
run() { name=$1; shift; $H prune "$@" --out $R/$name --overwrite --quiet --json > $R/$name.json; echo "$name done $(date +%T)"; }
run wanda --preset wanda --sparsity 0.5 --data wiki-vital
run wanda-update --preset wanda --update --sparsity 0.5 --data wiki-vital
run balanced --sparsity 0.5 --data wiki-vital
run quality --preset quality --sparsity 0.5 --data wiki-vital
run wanda24 --preset wanda --pattern 2:4 --sparsity 0.5 --data wiki-vital
run wanda24-update --preset wanda --update --pattern 2:4 --sparsity 0.5 --data wiki-vital
run balanced24 --pattern 2:4 --sparsity 0.5 --data wiki-vital
run quality24 --preset quality --pattern 2:4 --sparsity 0.5 --data wiki-vital
ROWS="wanda wanda-update balanced quality wanda24 wanda24-update balanced24 quality24"
$H eval --baseline embedded --compare $(for r in $ROWS; do echo $R/$r; done) --windows 64 --json --quiet > $R/eval.json
echo "eval done $(date +%T)"
