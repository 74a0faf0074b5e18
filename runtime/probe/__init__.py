"""Hardware micro-benchmarks and runtime calibrations: measure the machine this code runs on, and write a
hardware profile.

    machine.py          the machine: GPU GEMM and HBM, the CPU-GPU link, CPU DRAM, matmul, decode attention
    calibration.py      the runtime itself: its MoE layer, prefill layer, process memory, decode visits
    machine_profile.py  profile_machine(): all of them (progress bar), the CPU part only without CUDA;
                        profile_cpu_attention(): only the runtime's CPU decode attention
    profile_toml.py     write_profile_toml(result, ...): a complete profile in hrm/hardware_profiles/ format;
                        write_cpu_attention_update: an existing one with profile_cpu_attention()'s figures
    timing.py           medians of repeats after warm-up; random buffers
"""
from .calibration import (attention_in_pipeline, attention_in_pipeline_by_micro_batch, decode_visit_costs,
                          gpu_moe_flops_per_s, memory_baseline, moe_shape, prefill_costs, prefill_layers,
                          prefill_rest_flops, resident_weight_bytes, runtime_overheads, visit_probe)
from .machine import (cpu_attention_bytes_per_s, cpu_dram_bytes_per_s, cpu_matmul_flops, cpu_memory_bytes, cpu_name,
                      duplex_bytes_per_s, gpu_gemm_flops_per_s, gpu_hbm_bytes_per_s, gpu_square_gemm_flops_per_s,
                      link_bytes_per_s, pageable_h2d_bytes_per_s, reference_decode_attention,
                      runtime_attention_kernel)
from .machine_profile import ProbeError, profile_cpu_attention, profile_machine
from .profile_toml import (CPU_ATTENTION_KEYS, CPU_ATTENTION_LOOP_KEYS, check_cpu_attention_base, profile_toml,
                           read_profile_text, update_cpu_attention, write_cpu_attention_update, write_profile_toml)

__all__ = ["CPU_ATTENTION_KEYS", "CPU_ATTENTION_LOOP_KEYS", "ProbeError", "check_cpu_attention_base",
           "attention_in_pipeline", "attention_in_pipeline_by_micro_batch", "cpu_attention_bytes_per_s",
           "cpu_dram_bytes_per_s", "cpu_matmul_flops", "cpu_memory_bytes", "cpu_name", "decode_visit_costs",
           "duplex_bytes_per_s", "gpu_gemm_flops_per_s", "gpu_hbm_bytes_per_s", "gpu_moe_flops_per_s",
           "gpu_square_gemm_flops_per_s", "link_bytes_per_s", "memory_baseline", "moe_shape",
           "pageable_h2d_bytes_per_s", "prefill_costs", "prefill_layers", "prefill_rest_flops",
           "profile_cpu_attention", "profile_machine", "profile_toml", "reference_decode_attention",
           "read_profile_text", "resident_weight_bytes", "runtime_attention_kernel", "runtime_overheads",
           "update_cpu_attention", "visit_probe", "write_cpu_attention_update", "write_profile_toml"]
