"""The pipeline under many policies == the reference model (CPU, float64 so that policy-dependent
summation orders cannot flip a greedy choice); packing, page table, CPU attention, Measurement."""
import json
import math

import pytest

torch = pytest.importorskip("torch")

from hrm.policy import Policy  # noqa: E402
from hrm.spec import ModelSpec  # noqa: E402
from runtime.cpu_attention import decode_attention  # noqa: E402
from runtime.engine import DoesNotFit, Engine  # noqa: E402
from runtime.measure import Measurement, StageTime  # noqa: E402
from runtime.model import greedy_generate  # noqa: E402
from runtime.packing import in_order, layout, pack  # noqa: E402
from runtime.weights import PageTable, WeightStore  # noqa: E402
from oracles import QWEN2, naive_decode_attention

torch.set_num_threads(1)

QWEN3 = ModelSpec(name="tiny-qwen3", model_type="qwen3_moe", hidden_size=40, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12, vocab_size=89, num_experts=4,
                  num_experts_per_tok=2, moe_intermediate_size=20, qk_norm=True, norm_topk_prob=True)
PROMPT_LENS = (5, 9, 3, 7, 12, 4, 8)
MAX_NEW = 6

POLICIES = [
    Policy(7, 2),                                                        # cgopipe, 4 micro-batches, all streamed
    Policy(7, 3, weights_gpu_frac=0.4),                                  # 2 of 5 experts resident
    Policy(4, 1),                                                        # two passes, mu = 1 (lookahead 1)
    Policy(7, 7, weights_gpu_frac=1.0),                                  # one micro-batch, nothing streamed
    Policy(7, 2, kv_gpu_frac=0.5),                                       # 1 of 4 micro-batches keeps KV on device
    Policy(7, 2, schedule="s3"),
    Policy(7, 3, attention_on_gpu=True, schedule="s4"),
    Policy(7, 2, schedule="blocking"),
    Policy(7, 4, attention_on_gpu=True, schedule="blocking", weights_gpu_frac=0.2),
]


def _prompts(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def reference():
    with Engine(QWEN2, Policy(1, 1), dtype=torch.float64, seed=3) as e:
        prompts = _prompts(QWEN2.vocab_size)
        return prompts, [greedy_generate(p, MAX_NEW, e.store.dense, e.store.at_rest, QWEN2) for p in prompts]


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("policy", POLICIES, ids=[p.short() for p in POLICIES])
def test_greedy_tokens_equal_reference(reference, policy, padded):
    prompts, expected = reference
    with Engine(QWEN2, policy, dtype=torch.float64, seed=3) as e:
        tokens, m = e.generate(prompts, MAX_NEW, padded=padded)
    assert tokens == expected
    assert m.generated_tokens == len(prompts) * MAX_NEW


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("policy", [Policy(7, 7), Policy(7, 3, kv_gpu_frac=0.5), Policy(7, 4, schedule="s3")],
                         ids=["one-mb", "device-kv", "s3"])
def test_prefill_in_chunks_gives_the_reference_tokens(reference, monkeypatch, policy, padded):
    """Micro-batches prefilled a few sequences at a time (tiny chunk cap): KV rows, hidden states and
    first tokens land in the right rows."""
    import runtime.prefill as prefill
    monkeypatch.setattr(prefill, "PREFILL_CHUNK_TOKENS", 2 * max(PROMPT_LENS))
    prompts, expected = reference
    with Engine(QWEN2, policy, dtype=torch.float64, seed=3) as e:
        assert e.generate(prompts, MAX_NEW, padded=padded)[0] == expected


def test_prefill_chunks_cap_tokens_and_keep_whole_sequences():
    from runtime.packing import layout, pack
    from runtime.prefill import prefill_chunks
    lens = [5, 9, 3, 12, 4]
    (mb,) = layout(pack(lens, 5), lens, 2, False)
    chunks = prefill_chunks(mb, max_tokens=12)
    assert [r.start for r in chunks] == sorted(r.start for r in chunks) and chunks[0].start == 0
    assert sum(len(r) for r in chunks) == mb.size and chunks[-1].stop == mb.size
    for r in chunks:
        tokens = sum(mb.prefill_lens[i] for i in r)
        assert tokens <= 12 or len(r) == 1
    assert prefill_chunks(mb, max_tokens=1) == [range(i, i + 1) for i in range(mb.size)]
    assert prefill_chunks(mb, max_tokens=10**6) == [range(0, mb.size)]


def test_unwritten_cache_slots_do_not_leak(reference, monkeypatch):
    """Attention reads slots past a short sequence's end under a mask; NaN there must not leak (0 * NaN)."""
    import runtime.host_memory as host_memory      # every host buffer (KV cache, staging) starts as NaN
    monkeypatch.setattr(host_memory, "empty_host", lambda shape, dtype, pin=None: torch.full(shape, math.nan, dtype=dtype))
    prompts, expected = reference
    with Engine(QWEN2, Policy(7, 3), dtype=torch.float64, seed=3) as e:
        assert e.generate(prompts, MAX_NEW)[0] == expected


def test_prefill_staging_is_laid_out_before_the_pass_and_reused(reference):
    """The hidden states' host staging is taken before prefill starts (setup, not prefill time) from one
    buffer the engine keeps: later passes of the same size allocate nothing."""
    prompts, expected = reference
    with Engine(QWEN2, Policy(4, 2), dtype=torch.float64, seed=3) as e:
        out, m = e.generate(prompts, MAX_NEW)                      # two passes (7 prompts, N = 4)
        size = e.staging.nbytes
        assert out == expected and size > 0 and m.setup_s > 0
        assert e.generate(prompts, MAX_NEW)[0] == expected and e.staging.nbytes == size


def test_warm_up_reserves_the_host_buffers_of_the_coming_pass(reference, monkeypatch):
    """With max_new_tokens, warm_up allocates the host KV cache and staging of a full pass, so that the
    measured pass allocates nothing; the previous pass's device caches are dropped before the fit check."""
    prompts, expected = reference
    with Engine(QWEN2, Policy(7, 3, kv_gpu_frac=1 / 3), dtype=torch.float64, seed=3) as e:
        e.warm_up(prompts, MAX_NEW)
        kv_bytes, staging_bytes = e.kv.host_bytes, e.staging.nbytes
        assert kv_bytes > 0 and staging_bytes > 0
        import runtime.host_memory as host_memory

        def refuse(*a, **k):
            raise AssertionError("the measured pass allocated a host buffer")
        monkeypatch.setattr(host_memory, "empty_host", refuse)
        assert e.generate(prompts, MAX_NEW)[0] == expected
        assert (e.kv.host_bytes, e.staging.nbytes) == (kv_bytes, staging_bytes)
        assert e.kv.blocks(0, 0)[0][1].device == e.device         # micro-batch 0 keeps its cache on the device
        e.kv.release()
        with pytest.raises(IndexError):
            e.kv.blocks(0, 0)


def test_host_arena_zeroes_new_buffers_only(monkeypatch):
    """A new buffer starts at zero even where the allocator returns NaN; a pass that fits reuses it as left."""
    import runtime.host_memory as host_memory
    monkeypatch.setattr(host_memory, "empty_host", lambda shape, dtype, pin=None: torch.full(shape, math.nan, dtype=dtype))
    arena = host_memory.HostArena(torch.float32, pin=False)
    a = arena.take(8)
    assert torch.equal(a, torch.zeros(8))
    a.fill_(3.0)
    assert torch.equal(arena.take(5), torch.full((5,), 3.0)) and arena.nbytes == 32
    assert torch.equal(arena.take(16), torch.zeros(16)) and arena.nbytes == 64


def test_qk_norm_family_across_schedules():
    prompts = _prompts(QWEN3.vocab_size, seed=2)
    results = []
    for policy in (Policy(7, 2), Policy(7, 3, attention_on_gpu=True, schedule="s4"), Policy(5, 5, schedule="s3")):
        with Engine(QWEN3, policy, dtype=torch.float64, seed=4) as e:
            results.append(e.generate(prompts, 4)[0])
            ref = [greedy_generate(p, 4, e.store.dense, e.store.at_rest, QWEN3) for p in prompts]
    assert results[0] == results[1] == results[2] == ref


def test_sampling_is_seeded_and_independent_of_batching():
    prompts = _prompts(QWEN2.vocab_size)
    runs = []
    for policy, seed in ((Policy(7, 2), 11), (Policy(7, 7, weights_gpu_frac=1.0), 11), (Policy(7, 2), 12)):
        with Engine(QWEN2, policy, dtype=torch.float64, seed=3) as e:
            runs.append(e.generate(prompts, MAX_NEW, temperature=1.5, top_p=0.9, seed=seed)[0])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_prefill_only():
    prompts = _prompts(QWEN2.vocab_size)
    with Engine(QWEN2, Policy(7, 3), dtype=torch.float64, seed=3) as e:
        tokens, m = e.generate(prompts, 1)
        ref = [greedy_generate(p, 1, e.store.dense, e.store.at_rest, QWEN2) for p in prompts]
    assert tokens == ref
    assert m.decode_tokens == 0 and m.decode_layer_steps == 0


def test_prefill_streams_each_layer_in_pieces_between_chunks(reference, monkeypatch):
    """Chunks of at most 10 tokens (4 of them over 3 micro-batches) and pieces down to 1 byte: the next
    layer's streamed experts load in one piece after each chunk, every piece once, and the tokens are the
    reference's."""
    import runtime.prefill as prefill
    monkeypatch.setattr(prefill, "PREFILL_CHUNK_TOKENS", 10)
    monkeypatch.setattr(prefill, "PREFILL_PIECE_MIN_BYTES", 1)
    prompts, expected = reference
    with Engine(QWEN2, Policy(7, 3), dtype=torch.float64, seed=3, record=True) as e:
        tokens, _ = e.generate(prompts, MAX_NEW)
        spans = [s for s in e.last_spans if s.phase == "prefill"]
    assert tokens == expected
    loads = [s.label for s in spans if s.stage == "h2d_weights"]
    hidden = [s for s in spans if s.stage == "h2d_hidden"]
    chunks = len(hidden) // (QWEN2.num_hidden_layers - 1)
    assert chunks >= 4
    for visit in range(1, QWEN2.num_hidden_layers):
        pieces = [lab.split()[1] for lab in loads if lab.startswith(f"v{visit} ")]
        assert pieces == [f"p{i}-{i}" for i in range(chunks)], visit


def test_measurement_has_decode_stages():
    with Engine(QWEN2, Policy(7, 2), dtype=torch.float32, seed=3) as e:
        _, m = e.generate(_prompts(QWEN2.vocab_size), MAX_NEW)
    assert m.decode_layer_steps == QWEN2.num_hidden_layers * (MAX_NEW - 1)
    for name in ("gpu_compute", "cpu_attention", "h2d_weights", "h2d_hidden", "d2h"):
        assert m.stage(name).count > 0, name
    assert m.prefill_s > 0 and m.decode_s > 0 and m.tokens_per_s > 0


def test_engine_refuses_what_does_not_fit():
    huge = ModelSpec(name="huge", model_type="mixtral", hidden_size=1 << 16, num_hidden_layers=64,
                     num_attention_heads=64, num_key_value_heads=8, head_dim=1024, vocab_size=32000,
                     num_experts=64, num_experts_per_tok=2, moe_intermediate_size=1 << 16)
    with pytest.raises(DoesNotFit, match=r"^the weights: host memory needs [\d.,]+ TiB but [\d.,]+ GiB is available; "
                                         r"non_expert_weights \([\d.,]+ (?:[KMGT]i)?B\) does not fit$"):
        Engine(huge, Policy(4, 2))


# ---- packing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("lens, mu", [((5, 9, 3, 7, 12, 4, 8), 2), ((1,) * 5, 5), ((100, 1, 1, 1, 1, 1), 2),
                                      (tuple(range(1, 34)), 4)])
def test_pack_properties(lens, mu):
    p = pack(lens, mu)
    flat = [r for mb in p.micro_batches for r in mb]
    assert sorted(flat) == list(range(len(lens))) and not p.deferred
    assert len(p.micro_batches) == math.ceil(len(lens) / mu)
    assert all(1 <= len(mb) <= mu for mb in p.micro_batches)
    tokens = [sum(lens[r] for r in mb) for mb in p.micro_batches]
    full = [t for mb, t in zip(p.micro_batches, tokens) if len(mb) == mu]
    assert max(full) - min(full) <= max(lens)           # longest-first into the lightest micro-batch


def test_pack_is_algorithm_2():
    # longest first, each into the micro-batch with the fewest tokens (tokens after each step):
    # 12(r4)->0 [12,0,0]; 9(r1)->1 [12,9,0]; 8(r6)->2 [12,9,8]; 7(r3)->2 [12,9,15]; 5(r0)->1 [12,14,15];
    # 4(r5)->0 [16,14,15]; 3(r2)->1 [16,17,15]
    assert pack((5, 9, 3, 7, 12, 4, 8), 3).micro_batches == ((4, 5), (1, 0, 2), (6, 3))


def test_pack_defers_what_overflows_the_budget():
    p = pack((10, 10, 10, 3), 2, max_tokens_per_micro_batch=13)
    assert p.deferred == (2,)
    assert sorted(r for mb in p.micro_batches for r in mb) == [0, 1, 3]


def test_padded_layout_left_pads_to_the_longest_prompt():
    mbs = layout(in_order(3, 2), (4, 6, 2), max_new_tokens=5, padded=True)
    assert [mb.requests for mb in mbs] == [(0, 1), (2,)]
    assert mbs[0].pads == (2, 0) and mbs[1].pads == (4,)
    assert all(mb.prefill_len == 6 and mb.capacity == 10 for mb in mbs)
    packed = layout(pack((4, 6, 2), 2), (4, 6, 2), max_new_tokens=5, padded=False)
    assert all(set(mb.pads) == {0} for mb in packed)


# ---- page table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("experts, resident, pages", [(8, 0, 14), (5, 2, 3), (3, 3, 4), (7, 1, 1), (4, 1, 1000)])
def test_page_table_covers_every_expert_once(experts, resident, pages):
    pt = PageTable.build(experts, resident, pages, expert_elems=3 * 24 * 48)
    slots = [pt.slot(e) for e in range(experts)]
    assert len(set(slots)) == experts
    assert sorted(s for r, s in slots if r) == list(range(resident))
    assert sorted(s for r, s in slots if not r) == list(range(experts - resident))
    bounds = [(p.start, p.stop) for p in pt.pages]
    assert len(pt.pages) <= pages
    if experts > resident:
        assert bounds[0][0] == 0 and bounds[-1][1] == pt.streamed_elems
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bounds, bounds[1:]))
    else:
        assert not pt.pages


def test_lookup_reads_pages_that_landed_in_the_buffer():
    store = WeightStore(QWEN2, torch.float32, "cpu", num_resident=2, num_pages=3)
    from runtime.synthetic import synthesize
    synthesize(store, seed=0, progress=False)
    for page in store.page_table.pages:
        store.copy_page(layer=1, buffer=1, page=page)
    for e in range(QWEN2.num_experts):
        a, b = store.lookup(1, 1)(e), store.at_rest(1)(e)
        assert torch.equal(a.gate, b.gate) and torch.equal(a.up, b.up) and torch.equal(a.down, b.down)
        resident = e < 2
        assert (a.down.data_ptr() == b.down.data_ptr()) == resident


def test_synthetic_weights_do_not_depend_on_placement():
    stores = [WeightStore(QWEN2, torch.float32, "cpu", num_resident=r) for r in (0, 3)]
    from runtime.synthetic import synthesize
    for s in stores:
        synthesize(s, seed=5, progress=False)
    for e in range(QWEN2.num_experts):
        assert torch.equal(stores[0].at_rest_flat(2, e), stores[1].at_rest_flat(2, e))
    assert torch.equal(stores[0].dense.layers[1].attn.q_proj, stores[1].dense.layers[1].attn.q_proj)


# ---- CPU attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cpu_attention_matches_naive_softmax(dtype, tol):
    g = torch.Generator().manual_seed(0)
    b, n_kv, groups, ctx, d = 5, 3, 2, 33, 24
    q = torch.randn(b, n_kv * groups, d, generator=g).to(dtype)
    k = torch.randn(b, n_kv, ctx + 7, d, generator=g).to(dtype)
    v = torch.randn(b, n_kv, ctx + 7, d, generator=g).to(dtype)
    starts = torch.tensor([0, 3, 0, 10, 32])
    ends = torch.tensor([33, 33, 1, 20, 33])
    out = decode_attention(q, k, v, starts, ends)
    ref = naive_decode_attention(q, k, v, starts, ends)
    assert out.dtype == dtype and out.shape == (b, n_kv * groups * d)
    assert float((out.double() - ref).abs().max()) < tol


# ---- Measurement --------------------------------------------------------------------------------
def test_measurement_json_round_trip(tmp_path):
    m = Measurement(plan_id="abc", model="m", policy="N=4", device="cpu", num_sequences=4, prompt_tokens=40,
                    generated_tokens=32, decode_tokens=28, prefill_s=0.5, decode_s=2.0, decode_layer_steps=14,
                    stages=(StageTime("decode", "gpu_compute", 1.25, 56), StageTime("prefill", "d2h", 0.1, 4)),
                    gpu_peak_bytes=1 << 30, cpu_peak_bytes=123, pinned_bytes=456)
    path = tmp_path / "m.json"
    m.write(path)
    assert Measurement.read(path) == m
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    d = json.loads(path.read_text())
    assert d["derived"]["tokens_per_s"] == pytest.approx(32 / 2.5)
    assert m.per_layer_step_s("gpu_compute") == pytest.approx(1.25 / 14)
    assert m.stage("h2d_kv").count == 0


# ---- on the GPU: the same schedules with real streams, events and pinned memory -------------------
@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES, ids=[p.short() for p in POLICIES])
def test_gpu_greedy_tokens_equal_reference(policy):
    prompts = _prompts(QWEN2.vocab_size)
    with Engine(QWEN2, policy, dtype=torch.float64, seed=3, device="cuda") as e:
        ref = [greedy_generate(p, MAX_NEW, e.store.dense, e.store.at_rest, QWEN2) for p in prompts]
        for padded in (False, True):
            tokens, m = e.generate(prompts, MAX_NEW, padded=padded)
            assert tokens == ref
    assert m.gpu_peak_bytes > 0


WIDE = ModelSpec(name="wide", model_type="mixtral", hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                 num_key_value_heads=4, head_dim=64, vocab_size=1000, num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=2048)


@pytest.mark.gpu
def test_gpu_overlapped_schedules_equal_the_synchronous_one():
    """Same micro-batching, so the same kernels on the same shapes: any missing wait shows up as a
    difference from the blocking schedule, which synchronises after every task."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (int(n),), generator=g).tolist() for n in torch.randint(8, 64, (48,), generator=g)]
    runs = {}
    for policy in (Policy(48, 8, schedule="blocking"), Policy(48, 8), Policy(48, 8, schedule="s3"),
                   Policy(48, 8, weights_gpu_frac=0.25), Policy(48, 8, attention_on_gpu=True, schedule="blocking"),
                   Policy(48, 8, attention_on_gpu=True, schedule="s4")):
        with Engine(WIDE, policy, dtype=torch.float32, seed=1, device="cuda") as e:
            runs[policy.short()], m = e.generate(prompts, 8)
            if policy.schedule == "cgopipe" and policy.weights_gpu_frac == 0:
                spans = e.last_spans
    values = list(runs.values())
    assert all(v == values[0] for v in values[1:4]), "CPU-attention schedules differ"
    assert values[4] == values[5], "GPU-attention schedules differ"
    decode = [s for s in spans if s.phase == "decode"]

    def overlaps(a, b):
        return any(x.start_s < y.end_s and y.start_s < x.end_s
                   for x in decode if x.stage == a for y in decode if y.stage == b)
    assert overlaps("h2d_weights", "gpu_compute") and overlaps("cpu_attention", "gpu_compute")


def test_cuda_graphs_need_a_cuda_device():
    from runtime.engine import UnsupportedPolicy
    with pytest.raises(UnsupportedPolicy, match="CUDA"):
        Engine(QWEN2, Policy(4, 2), dtype=torch.float32, seed=0, device="cpu", cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", [Policy(48, 8), Policy(48, 8, weights_gpu_frac=0.25), Policy(48, 8, schedule="s3"),
                                    Policy(48, 8, attention_on_gpu=True, schedule="s4")],
                         ids=["cgopipe", "cgopipe-rw", "s3", "s4"])
def test_gpu_post_attention_graphs_give_the_eager_tokens(policy):
    """Graph replays run the eager kernels on copies of the same inputs: identical greedy tokens, with a
    partial last micro-batch (46 = 5 x 8 + 6) and uneven prompts."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (int(n),), generator=g).tolist() for n in torch.randint(8, 64, (46,), generator=g)]
    runs = []
    for graphs in (False, True):
        with Engine(WIDE, policy, dtype=torch.float32, seed=1, device="cuda", cuda_graphs=graphs) as e:
            runs.append(e.generate(prompts, 8)[0])
            if graphs:
                assert len(e.graphs) > 0
    assert runs[0] == runs[1]


EARLY_NEW = 12
STOPPING = [Policy(7, 2), Policy(7, 7, schedule="s3"), Policy(7, 3, attention_on_gpu=True, schedule="s4"),
            Policy(7, 2, schedule="blocking"), Policy(4, 2)]


@pytest.mark.parametrize("policy", STOPPING, ids=[p.short() for p in STOPPING])
def test_a_pass_ends_once_every_sequence_has_stopped(policy):
    """With stop tokens, decode ends two steps after the column where every sequence has sampled one:
    the rows are the reference's first columns, and the measurement counts what ran."""
    prompts = _prompts(QWEN2.vocab_size)
    with Engine(QWEN2, policy, dtype=torch.float64, seed=3) as e:
        full, _ = e.generate(prompts, EARLY_NEW)
        stops = {row[1] for row in full}                     # every row has stopped by column 1
        early, m = e.generate(prompts, EARLY_NEW, stop_token_ids=stops)
    for row, ref in zip(early, full):
        assert row == ref[:len(row)] and any(t in stops for t in row[:2])
    passes = [early[i:i + policy.batch_size] for i in range(0, len(early), policy.batch_size)]
    for rows in passes:                                       # ended at column <= 1, stopped before step 3
        assert len({len(r) for r in rows}) == 1 and len(rows[0]) <= 3 < EARLY_NEW
    assert m.generated_tokens == sum(map(len, early))
    assert m.decode_layer_steps == QWEN2.num_hidden_layers * sum(len(rows[0]) - 1 for rows in passes)
