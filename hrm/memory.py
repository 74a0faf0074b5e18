"""The memory account: every byte one pass of the runtime holds, by level and by named part.

Levels: `gpu` (the process's device memory: the CUDA context and the caching allocator's blocks),
`pinned` (page-locked host memory) and `pageable` (the rest of the process's resident host memory); the
host total is pinned + pageable. The optimizer constrains these totals, `estimate` reports them, and the
runtime sizes its buffers from the same parts and checks the whole account against the machine before
its first large allocation. One formula per part, here; nothing else computes a size.

A pass is described by its `PassShape` (sequences, KV slots, prefill tokens and chunks), made either from
a workload (`PassShape.nominal`, what the planner knows) or from the micro-batches the runtime actually
laid out (`PassShape.of_layout`). Every part is linear in r_w and r_c for fixed N and mu, so the
same function takes floats, numpy arrays (the grid) or pulp expressions (the MILP).

Sizes that belong to the machine and the software stack (the CUDA context with its loaded kernels and
library handles, the process's own resident memory before any model buffer, the caching allocator's slack
per byte of transient workspace: the blocks it keeps cached beside the live ones) come from the
profile's [memory] table, measured by `moe-lightning profile`; `MemoryProfile()` holds defaults for profiles that lack it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .policy import (KV_BLOCK_RATIO, MOE_DENSE_MAX_TOKENS, PREFILL_CHUNK_TOKENS, moe_grouped_slice_tokens,
                     prefill_chunk_sequences)
from .formats import ATTENTION_CHUNK_SEQUENCES, DEQUANT_CHUNK_ELEMS, DEQUANT_TEMP_BYTES_PER_ELEM
from .schedules import SCHEDULES
from .parallel import can_shard, shard_spec
from .spec import ModelSpec, Workload
from .units import GiB

ACC_BYTES = 4.0              # the runtime accumulates routing and expert outputs in fp32
INDEX_BYTES = 8.0            # int64 token ids, slots, positions
KV_TRANSFER_SLOTS = 4
"""Pinned buffers the prefill's KV offload cycles through (one (k, v) pair of a chunk each): the GPU runs at
most this many chunks ahead of the worker that copies them into the host cache."""
GPU_HEADROOM_FRAC = 0.03
"""Share of the GPU budget the search leaves unused beyond the account (kernels' own scratch the account
does not list, the allocator's worst case)."""
HOST_HEADROOM_FRAC = 0.05
"""Share of the host budget the search leaves unused beyond the account (the OS, the page cache, the
dataset and results in Python objects)."""


@dataclass(frozen=True)
class MemoryProfile:
    """Sizes that belong to the machine and the software stack, not to the model (measured by
    `moe-lightning profile`; these defaults stand in where a profile has no [memory] table)."""
    cuda_context_bytes: float = 0.5 * GiB      # per GPU: context, cuBLAS workspaces, loaded kernels
    process_baseline_bytes: float = 3.0 * GiB  # host RSS of the runtime before any model buffer (torch, CUDA libs)
    gpu_allocator_frac: float = 1.0            # caching allocator: reserved minus allocated at the peak, per workspace byte
    measured: bool = False
    source: str = "defaults (hrm.memory.MemoryProfile); run `moe-lightning profile` to measure them"


@dataclass(frozen=True)
class MemoryUse:
    """Peak bytes per level, part by part (values linear in r_w and r_c)."""
    gpu: dict
    pinned: dict
    pageable: dict

    @property
    def gpu_bytes(self):
        return sum(self.gpu.values())

    @property
    def pinned_bytes(self):
        return sum(self.pinned.values())

    @property
    def pageable_bytes(self):
        return sum(self.pageable.values())

    @property
    def cpu_bytes(self):
        """Host total: pinned + pageable."""
        return self.pinned_bytes + self.pageable_bytes

    @property
    def host(self) -> dict:
        """Host parts, pinned and pageable together (a part on both levels summed)."""
        out: dict = {}
        for parts in (self.pinned, self.pageable):
            for k, v in parts.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def levels(self) -> dict:
        return {"gpu": self.gpu, "pinned": self.pinned, "pageable": self.pageable}

    def rows(self) -> list[tuple[str, str, float]]:
        """(level, part, bytes) for every part."""
        return [(level, k, v) for level, parts in self.levels().items() for k, v in parts.items()]

    def to_dict(self) -> dict:
        return {"gpu": self.gpu, "pinned": self.pinned, "pageable": self.pageable,
                "gpu_total": self.gpu_bytes, "pinned_total": self.pinned_bytes,
                "pageable_total": self.pageable_bytes, "cpu_total": self.cpu_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryUse":
        return cls(**{k: {p: float(v) for p, v in d[k].items()} for k in ("gpu", "pinned", "pageable")})

    def floats(self) -> "MemoryUse":
        return MemoryUse(**{k: {p: float(v) for p, v in parts.items()} for k, parts in self.levels().items()})

    def times(self, k: int) -> "MemoryUse":
        """Every part k times: k ranks of this account."""
        return MemoryUse(**{level: {p: v * k for p, v in parts.items()} for level, parts in self.levels().items()})


def kv_slots_per_sequence(workload: Workload) -> float:
    """KV slots the runtime holds per sequence of a workload, at most: padded, the longest prompt's and
    every new token's; packed, its own prompt's, in blocks that hold at most KV_BLOCK_RATIO more."""
    new = max(workload.gen_len - 1, 0)
    padded = workload.max_prompt_len + new
    return float(padded if workload.padded else min(padded, KV_BLOCK_RATIO * (workload.avg_prompt_len + new)))


@dataclass(frozen=True)
class PassShape:
    """The geometry of one pass that sets its memory (numbers, or numpy arrays over (N, mu) pairs).

    KV slots are sequences x slots per sequence, summed over micro-batches; a chunk is the runtime's unit of
    prefill work (whole sequences, at most PREFILL_CHUNK_TOKENS tokens)."""
    sequences: object                # N
    micro_batch: object              # sequences of the largest micro-batch
    device_sequences: object         # sequences of the micro-batches whose cache is on the GPU
    kv_slots_device: object          # ... and their KV slots
    kv_slots_host: object            # ... and on the host
    kv_slots_micro_batch: object     # KV slots of the largest micro-batch whose KV is on the host (one layer
    #                                  of it streams to the GPU under GPU attention; nominal: any micro-batch)
    kv_capacity: object              # the most slots of one sequence (decode masks)
    prefill_tokens: object           # prefill slots of the pass, padding included (the staging between layers)
    chunk_tokens: object             # the largest prefill chunk's tokens
    chunk_rows: object               # ... its sequences
    chunk_kv_slots: object           # ... rows x slots its KV takes at prefill
    new_tokens: int                  # tokens generated per sequence

    @classmethod
    def nominal(cls, workload: Workload, N, mu, r_c) -> "PassShape":
        """What the planner knows of a pass: N sequences of the workload in micro-batches of mu, r_c of them
        (in whole micro-batches, as the runtime places them) keeping their KV on the GPU. Padded, every
        sequence holds the longest prompt's slots; packed, its own prompt's, in blocks that hold at most
        KV_BLOCK_RATIO more (hrm.policy.kv_blocks), and a micro-batch at most one longest prompt more than
        its share (Algorithm 2 fills the micro-batch with the fewest tokens)."""
        N, mu = np.asarray(N), np.asarray(mu)
        p, longest, gen = workload.prompt_len, workload.max_prompt_len, workload.gen_len
        capacity = longest + max(gen - 1, 0)
        mu_eff = np.minimum(mu, N)
        rows = np.minimum(mu_eff, prefill_chunk_sequences(p))
        per_seq = kv_slots_per_sequence(workload)
        total = N * per_seq
        per_mb = np.minimum(mu_eff * capacity, mu_eff * per_seq + KV_BLOCK_RATIO * capacity)
        return cls(sequences=N, micro_batch=mu_eff, device_sequences=r_c * N, kv_slots_device=r_c * total, kv_slots_host=(1 - r_c) * total,
                   kv_slots_micro_batch=per_mb, kv_capacity=capacity, prefill_tokens=N * p,
                   chunk_tokens=np.minimum(mu_eff * p, np.maximum(PREFILL_CHUNK_TOKENS, longest)),
                   chunk_rows=rows, chunk_kv_slots=rows * longest, new_tokens=gen)

    @classmethod
    def of_layout(cls, sizes, slots, capacity: int, num_device: int, chunks, new_tokens: int) -> "PassShape":
        """The pass the runtime laid out: per micro-batch its sequences and KV slots (the first `num_device`
        keep their KV on the GPU), the most slots of one sequence; per prefill chunk (tokens, rows, KV
        slots at prefill)."""
        return cls(sequences=sum(sizes), micro_batch=max(sizes), device_sequences=sum(sizes[:num_device]),
                   kv_slots_device=sum(slots[:num_device]),
                   kv_slots_host=sum(slots[num_device:]), kv_slots_micro_batch=max(slots[num_device:], default=0),
                   kv_capacity=capacity, prefill_tokens=sum(t for t, _, _ in chunks),
                   chunk_tokens=max(t for t, _, _ in chunks), chunk_rows=max(r for _, r, _ in chunks),
                   chunk_kv_slots=max(k for _, _, k in chunks), new_tokens=new_tokens)


# ---------------------------------------------------------------------------------------------------
# transient workspaces (the peak of live temporaries, counted from the runtime's code paths)

def moe_workspace_bytes(spec: ModelSpec, tokens):
    """Peak live temporaries of one MoE call over `tokens` tokens (numpy-broadcast): routing, then the
    larger of the paths that call can take."""
    t = np.asarray(tokens, float)
    H, I, E, k = spec.hidden_size, spec.moe_intermediate_size, spec.num_experts, spec.num_experts_per_tok
    ab = spec.dtypes.act_bytes
    tk = t * k
    route = t * E * (ab + ACC_BYTES) + tk * (2 * ACC_BYTES + INDEX_BYTES)
    # dense: every expert on every token; y [E, t, H], per group gate|up [n, t, 2I] and silu(gate)*up
    dense = t * E * ACC_BYTES + E * t * H * ab + np.maximum(E * t * 3 * I * ab + E * t * I * ab,
                                                            E * t * H * ACC_BYTES + t * H * ACC_BYTES)
    # grouped: slices of at most moe_grouped_slice_tokens tokens into one output; a slice's (token, slot)
    # pairs sorted by expert, their outputs written back per pair ([pairs (+1 spare), H]) and summed over
    # k; per store: gathered rows, gate|up and silu(gate)*up at once, then rows, silu(gate)*up and the
    # down projection
    ts = np.minimum(t, moe_grouped_slice_tokens(spec))
    tks = ts * k
    grouped = (t * H * ACC_BYTES + 6 * tks * INDEX_BYTES + (tks + 1) * H * ab
               + tks * ab * np.maximum(H + 3 * I, 2 * H + I))
    # sparse: per expert its tokens (twice the mean share, at most all tokens)
    n = np.minimum(t, 2.0 * tk / E)
    sparse = t * H * ACC_BYTES + 4 * tk * INDEX_BYTES + n * (2 * H * ab + 3 * I * ab + 2 * H * ACC_BYTES)
    if spec.swiglu_limit:          # the clamped GLU's temporaries (clamped gate and up, sigmoid, product)
        dense, grouped, sparse = dense + E * t * 3 * I * ab, grouped + tks * 3 * I * ab, sparse + n * 3 * I * ab
    paths = np.where(t <= MOE_DENSE_MAX_TOKENS, dense, np.maximum(grouped, sparse))
    if spec.dtypes.expert_format:   # the layer's experts dequantized first (runtime.quant), chunk by chunk
        paths = np.maximum(paths, DEQUANT_CHUNK_ELEMS * DEQUANT_TEMP_BYTES_PER_ELEM)
    shared = 0.0
    if spec.shared_expert_intermediate_size:
        shared = t * (3 * spec.shared_expert_intermediate_size * ab + H * ACC_BYTES)
    return route + paths + shared


def expert_dequant_bytes(spec: ModelSpec) -> float:
    """The device workspace one layer's routed experts are dequantized into, in the compute dtype, where
    they are stored quantized (runtime.quant.DequantWorkspace); 0 otherwise."""
    if not spec.dtypes.expert_format:
        return 0.0
    return spec.routed_expert_params_per_moe_layer * spec.dtypes.act_bytes


def qkv_elems_per_token(spec: ModelSpec) -> int:
    """What PreAttn hands the attention per token (the pass's q|k|v buffers): q, k and v of every head; with
    MLA the queries absorbed into the latent space [heads, kv_lora_rank + rope] and the token's latent entry
    (its first kv_lora_rank elements are the value)."""
    if spec.attention == "mla":
        return (spec.num_attention_heads + 1) * spec.attended_kv_elems_per_token_layer
    return (spec.num_attention_heads + 2 * spec.num_key_value_heads) * spec.head_dim


def attention_out_elems_per_token(spec: ModelSpec) -> int:
    """The attention's output per token before the O-projection (with MLA, in the latent space per head)."""
    if spec.attention == "mla":
        return spec.num_attention_heads * spec.kv_lora_rank
    return spec.q_dim


def decode_masks(spec: ModelSpec) -> int:
    """Decode masks a step builds per KV block: the full one, and the sliding window's where layers slide."""
    return 2 if spec.sliding_layers else 1


def decode_workspace_bytes(spec: ModelSpec, tokens):
    """Peak temporaries of one decode visit of a micro-batch of `tokens` sequences: PreAttn's norm and RoPE
    scratch, PostAttn's projections and MoE, the LM head's logits after the last layer."""
    t = np.asarray(tokens, float)
    H, ab = spec.hidden_size, spec.dtypes.act_bytes
    qk = qkv_elems_per_token(spec) + spec.q_dim          # with MLA, its queries before the absorption too
    pre = t * (H + 2 * qk) * ab
    post = 3 * t * H * ab + moe_workspace_bytes(spec, t)
    head = t * spec.vocab_size * (ab + ACC_BYTES) + t * H * ab
    return np.maximum(np.maximum(pre, post), head)


def prefill_workspace_bytes(spec: ModelSpec, tokens, rows, kv_slots):
    """Peak temporaries of one prefill (layer, chunk): the chunk's input, q/k/v with their RoPE copies and
    attention output live through the MoE; then the KV laid out per row (padded, transposed, and the
    previous chunk's pair still in flight to the host); the LM head over the chunk's last positions."""
    t, r = np.asarray(tokens, float), np.asarray(rows, float)
    H, ab = spec.hidden_size, spec.dtypes.act_bytes
    qkv = qkv_elems_per_token(spec) + (spec.q_dim if spec.attention == "mla" else 0)
    out = attention_out_elems_per_token(spec)
    sinks = qkv if spec.attention_sinks else 0                # q, k, v copied with the sink's extra element
    held = t * (2 * H + 2 * qkv + sinks + 2 * out) * ab       # input, previous chunk's output in flight, q/k/v, attention
    moe = held + 2 * t * H * ab + moe_workspace_bytes(spec, t)
    kv_pair = np.asarray(kv_slots, float) * spec.attended_kv_elems_per_token_layer * ab
    layout = held + t * H * ab + 2 * kv_pair
    if spec.dtypes.kv_format:   # quantized on the device before its D2H: one fp32 copy of K or V, and both stored
        slots = np.asarray(kv_slots, float)
        layout = layout + slots * spec.attended_kv_elems_per_token_layer * (ACC_BYTES / 2 + spec.dtypes.kv_bytes)
    head = held + r * spec.vocab_size * (ab + ACC_BYTES)
    attend = held + prefill_attention_scores_bytes(spec, rows, kv_slots)
    return np.maximum(np.maximum(np.maximum(moe, layout), head), attend)


def prefill_attention_scores_bytes(spec: ModelSpec, rows, kv_slots):
    """MLA's prefill attention holds a chunk's scores, [rows, heads, S, S] for S = kv_slots / rows slots per
    row, twice in fp32 at its peak (runtime.attention._one_kv_head_causal); fused kernels (the other
    attentions) hold none."""
    if spec.attention != "mla":
        return 0.0
    r, slots = np.asarray(rows, float), np.asarray(kv_slots, float)
    per_row = slots / np.maximum(r, 1.0)
    return r * spec.num_attention_heads * per_row ** 2 * 2 * ACC_BYTES


# ---------------------------------------------------------------------------------------------------
# the account

def per_sequence_device_bytes(spec: ModelSpec, new_tokens: int) -> float:
    """Device state of one sequence for a pass: current token, generated tokens, sampling uniforms (fp64),
    base slot, padding, prompt length, row index, whether it has ended (a byte), q|k|v and attention output
    buffers, the residual stream, and RoPE tables (cos, sin, signed sin) for every decode step. (Its decode
    step's slot and mask, one byte per KV slot, are where its attention runs: `decode_step_bytes`.)"""
    ab, d = spec.dtypes.act_bytes, spec.rotary_dim
    return (INDEX_BYTES * (5 + new_tokens) + 8.0 * new_tokens + 1.0
            + ab * (qkv_elems_per_token(spec) + attention_out_elems_per_token(spec) + spec.hidden_size
                    + 3 * new_tokens * d))


def prefill_input_bytes(spec: ModelSpec, prefill_tokens, sequences):
    """Device inputs of a pass's prefill, laid out before it: per slot its token id, cos and sin and gather
    index; per sequence its last position and its row in its length group."""
    return prefill_tokens * (2 * INDEX_BYTES + 2 * spec.rotary_dim * spec.dtypes.act_bytes) + sequences * 2 * INDEX_BYTES


def per_sequence_host_bytes(spec: ModelSpec, new_tokens: int) -> float:
    """Pageable host state of one sequence: padding, base slot, row index, and its sampling uniforms (fp64)."""
    return INDEX_BYTES * 3 + 8.0 * new_tokens


def decode_step_bytes(sequences, kv_slots, masks: int = 1):
    """A decode step's slot (int64) per sequence and its masks (a byte per KV slot each), where the attention runs."""
    return INDEX_BYTES * sequences + masks * kv_slots


def kv_quant_workspace_bytes(spec: ModelSpec, micro_batch, capacity):
    """Host temporaries of CPU attention over a scaled 8-bit KV cache (0 for other formats): the attention
    worker's reused chunk workspaces (ATTENTION_CHUNK_SEQUENCES sequences' K or V at the longest capacity,
    fp32 and in the compute dtype twice: the largest of runtime.cpu_attention's quantized kernels keeps both),
    and a decode append's quantization of a micro-batch's token (an fp32 copy, the values and scales)."""
    if not spec.dtypes.kv_format:
        return 0.0
    per_seq = spec.kv_elems_per_token_layer / 2          # K (or V) of one slot, one layer
    chunk = ATTENTION_CHUNK_SEQUENCES * per_seq * np.asarray(capacity, float) * (ACC_BYTES + 2 * spec.dtypes.act_bytes)
    append = np.asarray(micro_batch, float) * per_seq * (ACC_BYTES + spec.dtypes.kv_bytes)
    return chunk + append


def io_buffer_bytes_per_sequence(spec: ModelSpec) -> float:
    """Pinned q|k|v (to the CPU attention) and attention output (back) of one sequence."""
    return (qkv_elems_per_token(spec) + attention_out_elems_per_token(spec)) * spec.dtypes.act_bytes


def account(spec: ModelSpec, shape: PassShape, r_w, *, profile: MemoryProfile, num_gpus: int = 1,
            attention_on_gpu: bool = False, ffn_on_gpu: bool = True, schedule: str = "cgopipe",
            pin_all_weights: bool = True) -> MemoryUse:
    """Every part of one pass's peak memory. r_w: fraction of routed experts resident on the GPU (whole
    experts: the runtime keeps int(E r_w) of every layer). num_gpus > 1: the tensor-parallel ranks together,
    each holding its shard (hrm.parallel.shard_spec) and its own replicated parts and process, where the
    model can be sharded."""
    if can_shard(spec, num_gpus):
        return account(shard_spec(spec, num_gpus), shape, r_w, profile=profile, num_gpus=1,
                       attention_on_gpu=attention_on_gpu, ffn_on_gpu=ffn_on_gpu, schedule=schedule,
                       pin_all_weights=pin_all_weights).times(num_gpus)
    wb, ab = spec.dtypes.weight_bytes, spec.dtypes.act_bytes
    L = spec.num_hidden_layers
    layer_experts = spec.num_experts * spec.expert_bytes
    all_experts = spec.num_moe_layers * layer_experts     # leading dense layers hold no experts
    streamed = (1 - r_w) if ffn_on_gpu else 0.0
    kv_slot = spec.kv_bytes_per_token       # K and V of one slot, all layers
    kv_layer_slot = kv_slot / L
    n = shape.sequences
    stream = 0.0
    if attention_on_gpu:        # one layer of a host micro-batch's KV on the GPU (s4 double-buffers it)
        stream = SCHEDULES[schedule].kv_stream_buffers * shape.kv_slots_micro_batch * kv_layer_slot
    # decode step slots and masks where each sequence attends: on the GPU for the micro-batches whose KV
    # is there and for all under GPU attention, else on the host
    host_seqs = n - shape.device_sequences
    device_steps = decode_step_bytes(shape.device_sequences, shape.kv_slots_device, decode_masks(spec))
    host_steps = decode_step_bytes(host_seqs, shape.kv_slots_host, decode_masks(spec))
    if attention_on_gpu:
        device_steps, host_steps = device_steps + host_steps, 0.0
    workspace = np.maximum(prefill_workspace_bytes(spec, shape.chunk_tokens, shape.chunk_rows, shape.chunk_kv_slots),
                           decode_workspace_bytes(spec, shape.micro_batch))
    tensors = {
        "non_expert_weights": spec.non_expert_params * wb,
        "resident_experts": r_w * all_experts,
        "expert_double_buffer": 2 * streamed * layer_experts,
        "expert_dequant": expert_dequant_bytes(spec),
        "kv_cache": shape.kv_slots_device * kv_slot,
        "linear_state": shape.device_sequences * spec.linear_state_bytes_per_sequence(),
        "kv_stream_buffer": stream,
        "pass_state": n * per_sequence_device_bytes(spec, shape.new_tokens) + device_steps + shape.new_tokens,
        "prefill_inputs": prefill_input_bytes(spec, shape.prefill_tokens, n),
        "workspace": workspace,
    }
    gpu = {"cuda_context": profile.cuda_context_bytes * num_gpus, **tensors,
           "allocator_slack": profile.gpu_allocator_frac * workspace}
    offloaded = (1 - r_w) * all_experts
    pinned = {
        "offloaded_experts": offloaded if pin_all_weights else 0.0,
        "pinned_staging": 0.0 if pin_all_weights else 2 * streamed * layer_experts,
        "kv_cache": shape.kv_slots_host * kv_slot,
        "linear_state": host_seqs * spec.linear_state_bytes_per_sequence(),
        "prefill_staging": shape.prefill_tokens * spec.hidden_size * ab,
        "io_buffers": n * io_buffer_bytes_per_sequence(spec),
        "kv_transfer": KV_TRANSFER_SLOTS * shape.chunk_kv_slots * kv_layer_slot,
    }
    pageable = {
        "process_baseline": profile.process_baseline_bytes,
        "offloaded_experts": 0.0 if pin_all_weights else offloaded,
        "pass_state": n * per_sequence_host_bytes(spec, shape.new_tokens) + host_steps + shape.new_tokens,
        "kv_quant_workspace": kv_quant_workspace_bytes(spec, shape.micro_batch, shape.kv_capacity),
    }
    return MemoryUse(gpu=gpu, pinned=pinned, pageable=pageable)


def memory_use(s, N, mu, r_w, r_c) -> MemoryUse:
    """The account of a pass of N sequences in micro-batches of mu under the setting `s`
    (hrm.estimate.Setting), r_c realised by the caller."""
    hw = s.hardware
    return account(s.spec, PassShape.nominal(s.workload, N, mu, r_c), r_w, profile=hw.memory,
                   num_gpus=hw.gpu.count, attention_on_gpu=s.attention_on_gpu, ffn_on_gpu=s.ffn_on_gpu,
                   schedule=s.schedule, pin_all_weights=s.pin_all_weights)

