"""CPU attention calls inside the CGOPipe loop, experts resident vs streamed, at whole-run shapes."""
import json, sys, time
sys.path.insert(0, ".")
from hrm.hf_config import load_model
from runtime.probe.calibration import attention_in_pipeline
spec = load_model("mixtral-8x7b")
rows = []
for mb, n in ((1024, 2), (1024, 1), (2048, 1)):
    for frac in (1.0, 0.0):
        t0 = time.time()
        try:
            r = attention_in_pipeline(spec, micro_batch=mb, micro_batches=n, prompt_len=256, weights_gpu_frac=frac)
        except Exception as e:
            print("FAILED", mb, n, frac, repr(e)[:300], flush=True); continue
        r.update(micro_batch=mb, micro_batches=n, weights_gpu_frac=frac, wall_s=time.time() - t0)
        rows.append(r)
        print(f"mb {mb} x{n} r_w {frac}: call {r['loop_call_s']*1e3:.1f} ms, {r['cpu_attention_overlapped_bytes_per_s']/1e9:.1f} GB/s ({r['wall_s']:.0f} s)", flush=True)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
