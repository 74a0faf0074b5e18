#!/usr/bin/env bash
# Whole-model validation on the lent H200, in steps that fit one device call (run from the repo root):
#   CALL_S=590 bash benchmarks/whole_model_h200.sh kernels pin profile mixtral:0:2 qwen3:0:1 mixtral:2:12
#   CALL_S=590 bash benchmarks/whole_model_h200.sh qwen3:0:8 olmoe:0:1
# Steps:
#   kernels       the GPU tests of the runtime's kernels (grouped MoE against the sparse oracle, no host syncs)
#   rates         benchmarks/rates_at_run_shapes.py (the profile's rates at the runs' own shapes)
#   depth         benchmarks/rates_at_run_shapes.py --depth (CPU attention in the loop over 1 and 8 layers' KV)
#   moe           benchmarks/moe_kernels.py $MOE_ARGS (the MoE layer kernel by kernel, one and two stores;
#                 after an env: step its JSON gets that step's suffix too)
#   moecal        benchmarks/moe_calibration.py (the profile's gpu_moe_tflops curves, activation kernel off and on)
#   dequant       benchmarks/dequant_rate.py (one layer's int8 / int4 experts into bf16, against its price)
#   attn          benchmarks/cpu_attention_rate.py (every CPU decode-attention kernel, bf16 / int8 / fp8 KV, at the
#                 pipeline's batches and contexts: ms per call and GB/s of KV read, to choose DECODE_KERNEL)
#   variants      benchmarks/cpu_attention_rate.py (fused kernel only, bf16 and int8) once per setting of the fused
#                 kernel, each in its own process (VARIANTS="name:VAR=VAL ..."; default: as committed, 256-bit
#                 vectors, prefetch 16 slots ahead); the fastest (benchmarks/fused_variant.py) is exported for
#                 the steps after it, and for later calls while the machine stays warm (.device_state/)
#   beside        benchmarks/attention_beside_link.py $BESIDE_ARGS (the attention kernel alone and beside a pinned
#                 H2D copy stream, over one and many layers' caches)
#   kvloop        benchmarks/kv_format_in_loop.py (the in-loop time of 8-bit KV calls over bf16's) into the profile
#                 in use (later steps and calls use it, as `profile`); KVLOOP_ARGS, e.g. "--formats int8"
#   attnprofile   `moe-lightning profile --only cpu-attention` on the profile in use: its CPU attention figures
#                 re-measured with the kernels as they now are (later steps and calls use it, as `profile`)
#   layers        benchmarks/layer_kernels.py $LAYER_ARGS (a plan's few layers under torch.profiler: GPU time by
#                 kernel per (layer, prefill chunk) and per (layer, decode step))
#   visit         benchmarks/profile_visit.py $VISIT_ARGS (a decode visit's fixed cost split into host work and
#                 waits, e.g. VISIT_ARGS="--model olmoe-1b-7b --schedules s4 --micro-batches 1 --micro-batch-size 301")
#   hf            benchmarks/peer_hf_accelerate.py $HF_ARGS (the HF accelerate CPU-offload peer, whole Mixtral at 24 GB)
#   pin           benchmarks/pin_rate.py (how fast fresh host memory is page-locked)
#   gap           benchmarks/prefill_gap.py (the runtime's prefill on 4 layers, from the probe's setting to the plans')
#   sustained     benchmarks/sustained_rate.py (each MoE layer and a GEMM back to back for 20 s: do the clocks hold?)
#   smi           nvidia-smi samples clocks, power and throttle reasons every second until the call ends (smi.csv);
#                 /proc/meminfo's free, huge-page and locked memory every 2 s (meminfo.txt), THP settings (thp.txt)
#   profile       `moe-lightning profile` -> h200-measured.toml; later steps use it, in this call and in
#                 later calls while the machine stays warm (.device_state/, ignored); else PROFILE, default
#                 the committed hrm/hardware_profiles/h200-measured.toml
#   env:NAME=VAL  export NAME=VAL for the steps after it (e.g. PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True);
#                 their CSVs and kept plans get the suffix -VAL (an A/B of the same jobs in one call)
#   MODEL:A:B     benchmarks/whole_model.py, jobs A..B-1 of MODEL's chosen plans and sweep file
#                 (mixtral: 24GB and 48GB with sweeps/mixtral-8x7b-h200.json; qwen3: 24GB with
#                 sweeps/qwen3-30b-a3b-h200.json; olmoe, qwen15 (Qwen1.5-MoE-A2.7B): 24GB, the chosen
#                 plan; mixtral-int8, mixtral-int4:
#                 24GB and 48GB, the chosen plans with the experts stored in that format; mixtral-kv8,
#                 mixtral-int8-kv8: the same with an int8 KV cache; dsv2lite: DeepSeek-V2-Lite (MLA), 24GB, chosen)
# Every whole-model step stops starting jobs CALL_S seconds after the script began (less 20 s to pack).
# Everything lands in $OUT/whole (default benchmarks/results/whole_model/h200-run), packed into
# $OUT/whole.tgz at the end, because the device returns at most 8 files.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results/whole_model}
res="$out/whole"
mkdir -p "$res/keep"
# a profile measured by an earlier call on this same machine (kept there while it stays warm: an ignored path)
state=.device_state
default_profile=hrm/hardware_profiles/h200-measured.toml
[ -f "$state/h200-measured.toml" ] && default_profile="$state/h200-measured.toml"
profile=${PROFILE:-$default_profile}
echo "profile: $profile"
# the fused CPU attention's settings an earlier call's `variants` chose on this machine
[ -f "$state/fused_variant.env" ] && { . "$state/fused_variant.env"; echo "fused kernel: $(tr '\n' ' ' < "$state/fused_variant.env")"; }
start=$SECONDS
call_s=${CALL_S:-590}
left() { echo $((call_s - 20 - (SECONDS - start))); }
suffix=""
for step in "$@"; do
    echo "== $step $(date -u +%FT%TZ), $(left) s left"
    case $step in
    kernels)
        python -m pytest -q -m gpu tests/test_runtime_kernels.py tests/test_swiglu_kernel.py tests/test_decode_attention_device.py \
            tests/test_runtime_policies.py -p no:cacheprovider 2>&1 | tee "$res/kernels.log" | tail -5 ;;
    rates)
        python benchmarks/rates_at_run_shapes.py --out "$res/rates_at_run_shapes.json" 2>&1 | tee "$res/rates.log" | tail -12 ;;
    depth)
        python benchmarks/rates_at_run_shapes.py --depth --out "$res/attention_depth.json" 2>&1 | tee "$res/depth.log" | tail -4 ;;
    moe)
        python benchmarks/moe_kernels.py ${MOE_ARGS:-} --out "$res/moe_kernels$suffix.json" 2>&1 \
            | tee "$res/moe_kernels$suffix.log" | tail -12 ;;
    moecal)
        python benchmarks/moe_calibration.py --out "$res/moe_calibration.json" 2>&1 | tee "$res/moe_calibration.log" | tail -8 ;;
    dequant)
        # DEQUANT_ARGS: e.g. --models mixtral-8x7b --variants
        python benchmarks/dequant_rate.py --hardware "$profile" ${DEQUANT_ARGS:-} --out "$res/dequant_rate.json" 2>&1 | tee "$res/dequant.log" | tail -8 ;;
    attn)
        # ATTN_ARGS: a smaller grid for a call that has more to do (e.g. --batches 600 1800 --ctx 288)
        python benchmarks/cpu_attention_rate.py --hardware "$profile" --time-limit-s "$(left)" ${ATTN_ARGS:-} \
            --out "$res/cpu_attention_rate.json" 2>&1 | tee "$res/cpu_attention_rate.log" | tail -6 ;;
    variants)
        read -ra variants <<<"${VARIANTS:-base: narrow:MOE_LIGHTNING_FUSED_VECTOR_BITS=256 pf16:MOE_LIGHTNING_FUSED_PREFETCH_SLOTS=16}"
        for v in "${variants[@]}"; do
            env ${v#*:} python benchmarks/cpu_attention_rate.py --hardware "$profile" --formats bf16 int8 --kernels fused \
                ${ATTN_ARGS:---batches 600 1800 --ctx 288 --repeats 3} --out "$res/attn-${v%%:*}.json" 2>&1 \
                | tee "$res/attn-${v%%:*}.log" | tail -2
        done
        python benchmarks/fused_variant.py "$res"/attn-*.json > "$res/fused_variant.env" 2> "$res/fused_variant.log"
        cat "$res/fused_variant.log" "$res/fused_variant.env"; . "$res/fused_variant.env"
        mkdir -p "$state"; cp "$res/fused_variant.env" "$state/" ;;
    beside)
        # the attention kernel alone and beside a pinned H2D copy stream, over 1 and 32 layers' caches; BESIDE_ARGS
        python benchmarks/attention_beside_link.py ${BESIDE_ARGS:-} --out "$res/attention_beside_link.json" 2>&1 \
            | tee "$res/attention_beside_link.log" | tail -12 ;;
    kvloop)
        # the in-loop multiple of each 8-bit KV cache's calls over bf16's (benchmarks/kv_format_in_loop.py), into a
        # copy of the profile in use; later steps and calls use it, as `profile`
        python benchmarks/kv_format_in_loop.py --base "$profile" -o "$res/h200-measured.toml" \
            --out "$res/kv_format_in_loop.json" ${KVLOOP_ARGS:-} 2>&1 | tee "$res/kv_format_in_loop.log" | tail -4
        if [ -f "$res/h200-measured.toml" ]; then
            profile="$res/h200-measured.toml"; mkdir -p "$state"; cp "$profile" "$state/"
        fi ;;
    attnprofile)
        python -m moe_lightning_cli.main profile --only cpu-attention --base "$profile" -o "$res/h200-measured.toml" \
            --name h200-measured --no-progress 2>&1 | tee "$res/attnprofile.log" | tail -30
        if [ -f "$res/h200-measured.toml" ]; then
            profile="$res/h200-measured.toml"; mkdir -p "$state"; cp "$profile" "$state/"
        fi ;;
    layers)
        # LAYER_ARGS: --plan PLAN.json ... [--layers 2] [--mla-prefill matmul sdpa]
        python benchmarks/layer_kernels.py ${LAYER_ARGS:-} --out "$res/layer_kernels$suffix.json" 2>&1 \
            | grep -v USDT | tee "$res/layer_kernels$suffix.log" | tail -40 ;;
    visit)
        python benchmarks/profile_visit.py ${VISIT_ARGS:-} --out "$res/visit_profile$suffix.json" 2>&1 \
            | tee "$res/visit_profile$suffix.log" | tail -30 ;;
    deepspeed)
        # peer: DeepSpeed ZeRO-Inference (benchmarks/peer_deepspeed.py), whole Mixtral-8x7B at 24 GB, installed from
        # the carried wheels (.whl/deepspeed, made by benchmarks/build_deepspeed_wheels.sh: carry it); DS_ARGS: e.g. "--batch-sizes 192,128 --stop-after-ok 1"
        # every wheel it needs is carried, so no resolving (pip --no-index could not see the installed numpy)
        python -m pip install -q --no-index --no-deps .whl/deepspeed/*.whl 2>&1 | tail -3
        python benchmarks/peer_deepspeed.py --gpu-budget-gib 24 --prompt-len 256 --gen-len 32 \
            --time-limit-s "$(left)" ${DS_ARGS:-} --output "$res/peer_deepspeed$suffix.json" 2>&1 \
            | tee "$res/peer_deepspeed$suffix.log" | grep -v -E '^\[[0-9-]+ [0-9:,]+\] \[INFO\]' | tail -25 ;;
    hf)
        # peer: HF transformers + accelerate CPU offload (benchmarks/peer_hf_accelerate.py), whole Mixtral-8x7B at
        # 24 GB; one timed generate is ~8 minutes (every layer streamed from pageable memory 33 times), so give
        # a descending list and stop at the first that runs: HF_ARGS="--batch-sizes 320,256,192 --stop-after-ok 1"
        python benchmarks/peer_hf_accelerate.py --gpu-budget-gib 24 --prompt-len 256 --gen-len 32 \
            --experts-implementation eager --time-limit-s "$(left)" ${HF_ARGS:-} \
            --output "$res/peer_hf_accelerate$suffix.json" 2>&1 | tee "$res/peer_hf_accelerate$suffix.log" | tail -15 ;;
    pin)
        python benchmarks/pin_rate.py --gib 16 --rounds 2 --out "$res/pin_rate.json" ;;
    gap)
        python benchmarks/prefill_gap.py --layers 4 --out "$res/prefill_gap.json" 2>&1 | tee "$res/prefill_gap.log" | tail -12 ;;
    sustained)
        python benchmarks/sustained_rate.py --seconds 10 --idle-s 3 --out "$res/sustained_rate.json" 2>&1 | tail -5 ;;
    smi)
        nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
            --format=csv,noheader -l 1 > "$res/smi.csv" 2>&1 &
        smi_pid=$!
        # the host's huge pages while the jobs run (the CPU attention's reads of a mostly pinned host)
        lscpu > "$res/lscpu.txt" 2>&1
        cat /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag > "$res/thp.txt" 2>&1
        while :; do echo "t $(date +%s)"; grep -E '^(MemFree|MemAvailable|AnonHugePages|Mlocked|Unevictable):' /proc/meminfo
            sleep 2; done > "$res/meminfo.txt" 2>&1 &
        meminfo_pid=$! ;;
    profile)
        python -m moe_lightning_cli.main profile -o "$res/h200-measured.toml" --name h200-measured --no-progress \
            2>&1 | tee "$res/profile.log" | tail -40
        if [ -f "$res/h200-measured.toml" ]; then
            profile="$res/h200-measured.toml"; mkdir -p "$state"; cp "$profile" "$state/"
        fi ;;
    env:*=*)
        assign=${step#env:}
        export "${assign%%=*}=${assign#*=}"
        suffix="-$(echo "${assign#*=}" | tr -c 'A-Za-z0-9_.\n-' '_')"
        echo "exported ${assign%%=*}=${assign#*=}; results suffix $suffix" ;;
    *:*:*)
        IFS=: read -r model a b <<<"$step"
        case $model in
        mixtral) args=(--model mixtral-8x7b --gpu-memory 24GB 48GB --policies benchmarks/sweeps/mixtral-8x7b-h200.json) ;;
        qwen3) args=(--model qwen3-30b-a3b --gpu-memory 24GB --policies benchmarks/sweeps/qwen3-30b-a3b-h200.json) ;;
        olmoe) args=(--model olmoe-1b-7b --gpu-memory 24GB) ;;
        qwen15) args=(--model qwen1.5-moe-a2.7b --gpu-memory 24GB) ;;
        mixtral-int8|mixtral-int4) args=(--model mixtral-8x7b --gpu-memory 24GB 48GB --expert-dtype "${model#mixtral-}") ;;
        mixtral-kv8) args=(--model mixtral-8x7b --gpu-memory 24GB 48GB --kv-dtype int8) ;;
        mixtral-int8-kv8) args=(--model mixtral-8x7b --gpu-memory 24GB 48GB --expert-dtype int8 --kv-dtype int8) ;;
        dsv2lite) args=(--model deepseek-v2-lite --gpu-memory 24GB) ;;
        *) echo "unknown model $model"; continue ;;
        esac
        python benchmarks/whole_model.py "${args[@]}" --hardware "$profile" --prompt-len 256 --gen-len 32 \
            --jobs "$a:$b" --time-limit-s "$(left)" --timeout 400 --out "$res/$model$suffix.csv" --keep "$res/keep$suffix/$model" \
            2>&1 | tee -a "$res/whole.log" ;;
    *) echo "unknown step $step" ;;
    esac
    # packed after every step: a call cut short still returns what its finished steps measured
    free -g > "$res/free.txt" 2>&1
    tar -C "$out" -czf "$out/whole.tgz.part" whole && mv "$out/whole.tgz.part" "$out/whole.tgz"
done
[ -n "${smi_pid:-}" ] && kill "$smi_pid" 2>/dev/null
[ -n "${meminfo_pid:-}" ] && kill "$meminfo_pid" 2>/dev/null
tar -C "$out" -czf "$out/whole.tgz.part" whole && mv "$out/whole.tgz.part" "$out/whole.tgz" && echo "packed $out/whole.tgz"
