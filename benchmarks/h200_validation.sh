#!/usr/bin/env bash
# The GPU validation (issues 4 and 5), run on the lent H200 machine from the repo root in phases, so that
# each device call stays under its time limit:
#   bash benchmarks/h200_validation.sh tests profile sweep48             (one call, ~8 min)
#   bash benchmarks/h200_validation.sh sweep24 full24                    (the next)
# Set the environment for the script itself (T24_S=... bash benchmarks/h200_validation.sh ...).
# Phases:
#   tests    the GPU-only tests
#   profile  `moe-lightning profile`: measures the machine, incl. the runtime's fixed decode costs, its
#            CPU attention rate inside the pipelined loop and its own prefill (per layer and chunk, and
#            per pass) -> h200-measured.toml (later phases use it)
#   full24   issue 4: the optimizer's plan for all 32 layers of Mixtral-8x7B under a 24 GB GPU budget,
#            prompt 256, gen 32, run end to end with a timeline and a trace. The host budget is 80% of
#            RAM (--cpu-frac 0.8), not the default 90%: the runtime pins all of it, and the process needs
#            the rest
#   sweep24, sweep48   benchmarks/validate.py: predicted vs measured over a sweep of policies, Mixtral-8x7B
#            shapes cut to 8 layers (budgets scaled as validate.py says), prompt 256, gen 32
#   visit    benchmarks/profile_visit.py: the decode-visit probe under torch.profiler, per schedule
#   peer     HF transformers + accelerate CPU offload on the same model, budget and workload
# Everything lands in $OUT/h200 (default benchmarks/results/h200); $OUT/h200.tgz packs it, because the
# device returns at most 8 files (packed after each phase). Env: PROFILE (default hardware_profiles/h200-measured.toml),
# T24_S / T48_S (time limits of the sweeps), MAX_POLICIES, TESTS_S, VISIT_S, VISIT_LAYERS (of the visit phase), SKIP24 / SKIP48 (start a sweep at that policy).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
res="$out/h200"
mkdir -p "$res"
profile=${PROFILE:-hardware_profiles/h200-measured.toml}
cli=(python -m moe_lightning_cli.main)
# sweep GIB TIME_LIMIT_S SKIP: validate.py under a GIB GiB full-model budget -> validation_GIBgb[_fromSKIP].*
sweep() {
    local name="validation_${1}gb${3:+_from$3}"
    python benchmarks/validate.py --num-layers 8 --prompt-len 256 --gen-len 32 --max-policies "${MAX_POLICIES:-16}" \
        --hardware "$profile" --gpu-budget "${1}GiB" --time-limit-s "$2" --skip "${3:-0}" \
        --out "$res/$name.csv" 2>&1 | tee "$res/$name.log"
}
for phase in "$@"; do
    echo "== $phase $(date -u +%FT%TZ)"
    case $phase in
    tests)
        timeout "${TESTS_S:-180}" python -m pytest -q -m gpu tests 2>&1 | tail -12 ;;
    profile)
        "${cli[@]}" profile -o "$res/h200-measured.toml" --name h200-measured --no-progress 2>&1 \
            | tee "$res/profile.log" | tail -40
        [ -f "$res/h200-measured.toml" ] && profile="$res/h200-measured.toml" ;;
    full24)
        d="$res/full_model_32_layers"
        mkdir -p "$d"
        "${cli[@]}" plan --model mixtral-8x7b --hardware "$profile" --gpu-memory 24GB --cpu-frac 0.8 \
            --prompt-len 256 --max-prompt-len 256 --gen-len 32 -o "$d/plan.json" > "$d/plan.txt" 2>&1
        tail -32 "$d/plan.txt"
        /usr/bin/time -v timeout 400 "${cli[@]}" run --plan "$d/plan.json" --hardware "$profile" \
            --timeline "$d/timeline.png" --trace "$d/trace.json" -o "$d/measurement.json" 2>&1 \
            | tee "$d/run.txt" | grep -v "^\s*\(Average\|Socket\|Signals\|Swaps\|File system\|Page size\)" ;;
    sweep24)
        sweep 24 "${T24_S:-330}" "${SKIP24:-}" ;;
    sweep48)
        sweep 48 "${T48_S:-330}" "${SKIP48:-}" ;;
    visit)
        timeout "${VISIT_S:-240}" python benchmarks/profile_visit.py --schedules s4,cgopipe,s3,blocking \
            --layers "${VISIT_LAYERS:-1,4}" --out "$res/visit_profile.json" 2>&1 | tail -6 ;;
    peer)
        timeout "${PEER_S:-200}" python benchmarks/peer_hf_accelerate.py --num-layers 8 --gpu-budget-gib 24 \
            --batch-sizes 16 --prompt-len 256 --gen-len 32 --experts-implementation eager \
            --output "$res/peer_hf_24gb_b16_gen32.json" 2>&1 | tail -6 ;;
    *)
        echo "unknown phase $phase (tests profile visit full24 sweep24 sweep48 peer)"; exit 2 ;;
    esac
    # packed after every phase: a call cut off by its time limit still returns what finished
    tar czf "$out/h200.tgz.part" -C "$out" h200 && mv "$out/h200.tgz.part" "$out/h200.tgz"
done
echo "packed $out/h200.tgz"
