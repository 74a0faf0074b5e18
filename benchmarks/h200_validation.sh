#!/usr/bin/env bash
# The GPU validation run (issue 5), as executed on the lent H200 machine from the repo root:
#   bash benchmarks/h200_validation.sh            (writes everything under $OUT, or benchmarks/results/h200)
# 1. the GPU-only kernel tests, 2. measure the machine (hardware profile incl. the runtime's fixed decode
# costs), 3. predicted vs measured sweeps for Mixtral-8x7B shapes (8 of 32 layers, synthetic bf16 weights)
# under a 24 GiB full-model GPU budget, prompt 256, gen 32 (benchmarks/validate.py), 4. the HF
# transformers + accelerate CPU-offload peer on the same model, budget and workload, 5. the same sweep
# under a 48 GiB budget with the time that is left (BUDGET_S in all).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/h200}
mkdir -p "$out"
T0=$(date +%s)
left() { echo $(( ${BUDGET_S:-570} - ($(date +%s) - T0) )); }
timeout 60 python -m pytest -q -m gpu tests/test_runtime_kernels.py 2>&1 | tail -3
python -m moe_lightning_cli.main profile -o "$out/h200-measured.toml" --name h200-measured --no-progress 2>&1 | tee "$out/profile.log" | tail -8
common=(--hardware "$out/h200-measured.toml" --num-layers 8 --prompt-len 256 --gen-len 32 --max-policies 12)
python benchmarks/validate.py "${common[@]}" --gpu-budget 24GiB --time-limit-s "${T24_S:-150}" \
    --out "$out/validation_24gb.csv" 2>&1 | tee "$out/validation_24gb.log"
echo "seconds left: $(left)"
timeout 200 python benchmarks/peer_hf_accelerate.py --num-layers 8 --gpu-budget-gib 24 \
    --batch-sizes 64 --prompt-len 256 --gen-len 32 --output "$out/peer_hf_24gb.json" 2>&1 | tail -6
echo "seconds left: $(left)"
python benchmarks/validate.py "${common[@]}" --gpu-budget 48GiB --time-limit-s $(( $(left) - 40 )) \
    --out "$out/validation_48gb.csv" 2>&1 | tee "$out/validation_48gb.log"
