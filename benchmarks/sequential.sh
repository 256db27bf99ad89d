#!/bin/bash
# --sequential with the quality preset (the second-order sums from the pruned inputs of the same pass)
# against the same preset from the dense model's cached statistics, on the BENCHMARK.md protocol
# (calibration 32 x 512 of wiki-vital; --data wiki-vital). Chosen on validation (16 windows), reported on
# test (64 windows). Needs runs/headline/quality and runs/headline/quality24 (bash benchmarks/headline.sh).
# Reproduce: bash benchmarks/sequential.sh   (writes runs/sequential/*.json)
set -e
cd "$(dirname "$0")/.."
H=".venv/bin/hybridprune"
R=runs/sequential
mkdir -p $R
run() { name=$1; shift; $H prune "$@" --out $R/$name --overwrite --quiet --json > $R/$name.json; echo "$name done $(date +%T)"; }
run quality-seq --preset quality --sequential --sparsity 0.5 --data wiki-vital
run quality24-seq --preset quality --sequential --pattern 2:4 --sparsity 0.5 --data wiki-vital
FOLDERS="runs/headline/quality $R/quality-seq runs/headline/quality24 $R/quality24-seq"
$H eval --compare $FOLDERS --split validation --windows 16 --json --quiet > $R/validation16.json
echo "validation done $(date +%T)"
$H eval --compare $FOLDERS --windows 64 --json --quiet > $R/test64.json
echo "test done $(date +%T)"
