#!/usr/bin/env bash
# The GPU validation run (issue 5), as executed on the lent H200 machine from the repo root:
#   bash benchmarks/h200_validation.sh            (writes everything under $OUT, or benchmarks/results/h200)
# 1. measure the machine (hardware profile incl. the runtime's fixed decode costs),
# 2. predicted vs measured sweeps for Mixtral-8x7B shapes (8 of 32 layers, synthetic bf16 weights) under
#    24 GiB and 48 GiB full-model GPU budgets, prompt 256, gen 32 (benchmarks/validate.py),
# 3. the HF transformers + accelerate CPU-offload peer on the same model, budget and workload.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/h200}
mkdir -p "$out"
T0=$(date +%s)
left() { echo $(( ${BUDGET_S:-560} - ($(date +%s) - T0) )); }
python -m moe_lightning_cli.main profile -o "$out/h200-measured.toml" --name h200-measured --no-progress 2>&1 | tee "$out/profile.log"
common=(--hardware "$out/h200-measured.toml" --num-layers 8 --prompt-len 256 --gen-len 32 --max-policies 12)
python benchmarks/validate.py "${common[@]}" --gpu-budget 24GiB --time-limit-s "${T24_S:-170}" \
    --out "$out/validation_24gb.csv" 2>&1 | tee "$out/validation_24gb.log"
python benchmarks/validate.py "${common[@]}" --gpu-budget 48GiB --time-limit-s "${T48_S:-130}" \
    --out "$out/validation_48gb.csv" 2>&1 | tee "$out/validation_48gb.log"
echo "seconds left for the peer: $(left)"
timeout $(( $(left) > 30 ? $(left) : 30 )) python benchmarks/peer_hf_accelerate.py --num-layers 8 --gpu-budget-gib 24 \
    --batch-sizes 64 --prompt-len 256 --gen-len 32 --output "$out/peer_hf_24gb.json" 2>&1 | tail -20
