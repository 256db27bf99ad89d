# First-order statistics alone, the second-order entry alone (first-order cached), and both in one pass
# (an empty cache; what a first `prune` with the default preset does), SmolLM2, 16 x 512 windows, 1 thread.
# Measured at 3591694, 2026-12-01 (a Qwen run on the other core), two rounds: 33.9 / 42.8 / 55.6 s and 33.2 / 45.9 / 53.2 s:
# one pass for both costs 1.6 first-order passes, against 2.3 for two passes (0.69x).
#   bash benchmarks/calibrate_one_pass.sh
cd "$(dirname "$0")/.."
export HYBRIDPRUNE_THREADS=1
for i in 1 2; do
C=$(mktemp -d); ln -s "$HOME/.cache/hybridprune/models" $C/models
s=$(date +%s.%N); .venv/bin/hybridprune calibrate --nsamples 16 --seqlen 512 --cache-dir $C --json > /dev/null 2>&1; e=$(date +%s.%N)
echo "stats only: $(echo "$e - $s" | bc)"
s=$(date +%s.%N); .venv/bin/hybridprune calibrate --nsamples 16 --seqlen 512 --cache-dir $C --hessians --json > /dev/null 2>&1; e=$(date +%s.%N)
echo "second-order alone (stats cached): $(echo "$e - $s" | bc)"
C2=$(mktemp -d); ln -s "$HOME/.cache/hybridprune/models" $C2/models
s=$(date +%s.%N); .venv/bin/hybridprune calibrate --nsamples 16 --seqlen 512 --cache-dir $C2 --hessians --json > /dev/null 2>&1; e=$(date +%s.%N)
echo "both in one pass: $(echo "$e - $s" | bc)"
rm -rf $C $C2
done
