#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, in one go (issues 2, 4 and 5):
# the native test suite, then the benchmark grid of issue 4 (llama-7b, bf16, r in {8, 16, 64},
# dropout in {0, 0.1}, train and infer) plus short sequences (M = 512), as JSON and PNG.
#
#   bash bench/gpu_session.sh [OUT_DIR]      (default bench/results; commit what it writes)
set -euo pipefail
out=${1:-bench/results}
mkdir -p "$out"
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")

make test-gpu 2>&1 | tail -n 40 | tee "$out/$gpu-test-gpu.txt"

for rank in 8 16 64; do
  for dropout in 0 0.1; do
    for mode in train infer; do
      name="$gpu-llama-7b-r$rank-p$dropout-$mode"
      python -m lorafuse.bench --shapes llama-7b --rank "$rank" --dropout "$dropout" --mode "$mode" \
        --no-progress --json "$out/$name.json" --plot "$out/$name.png" | tee "$out/$name.txt"
    done
  done
done

for rank in 16 64; do
  name="$gpu-llama-7b-M512-r$rank-p0.1-train"
  python -m lorafuse.bench --shapes llama-7b --tokens 512 --rank "$rank" --dropout 0.1 --mode train \
    --no-progress --json "$out/$name.json" | tee "$out/$name.txt"
done

# DoRA at r=16 without dropout (with dropout PEFT's DoRA trains another function: bench/README.md).
for mode in train infer; do
  name="$gpu-llama-7b-dora-r16-p0-$mode"
  python -m lorafuse.bench --dora --shapes llama-7b --rank 16 --dropout 0 --mode "$mode" \
    --no-progress --json "$out/$name.json" --plot "$out/$name.png" | tee "$out/$name.txt"
done
