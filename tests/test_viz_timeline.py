"""viz.timeline: the Gantt chart of a recorded run has its five resource lanes, a legend, a time axis in
ms and a title; busy fractions are the union of each lane's spans over the window; the default window is
a few layer visits in the middle of decode; `moe-lightning run --timeline` writes a PNG on the CPU."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from runtime.measure import Span  # noqa: E402
from viz import timeline as vt  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LANE_NAMES = ["H2D weights", "H2D activations/KV", "D2H", "GPU compute", "CPU attention"]


def synthetic_spans(layers: int = 2, steps: int = 4, mbs: int = 2, ms: float = 1e-3) -> list[Span]:
    """A CGOPipe-like decode trace: per (visit, micro-batch) pre-attention GPU kernel, D2H of q/k/v, CPU
    attention, H2D of the attention output, post-attention kernel, and a weight page for the next visit."""
    spans, t = [], 0.0
    for visit in range(layers, layers * steps):
        layer = visit % layers
        for j in range(mbs):
            lab = f"v{visit} L{layer} mb{j}"
            spans += [Span("decode", "gpu_compute", lab, t, t + 2 * ms),
                      Span("decode", "d2h", lab, t + 2 * ms, t + 2.5 * ms),
                      Span("decode", "cpu_attention", lab, t + 2.5 * ms, t + 5 * ms),
                      Span("decode", "h2d_weights", f"v{visit + 1} p{j}-{j}", t + 2.5 * ms, t + 4 * ms),
                      Span("decode", "h2d_hidden", lab, t + 5 * ms, t + 5.5 * ms),
                      Span("decode", "h2d_kv", lab, t + 5.2 * ms, t + 5.8 * ms),
                      Span("decode", "gpu_compute", lab, t + 5.5 * ms, t + 6 * ms)]
            t += 6 * ms
    return [Span("prefill", "gpu_compute", "v0 L0 mb0", -1.0, -0.5)] + spans


def test_figure_has_lanes_legend_ms_axis_and_title():
    fig = vt.timeline_figure(synthetic_spans(), title="tiny: N=4, mu=2")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == LANE_NAMES
    assert "(ms)" in ax.get_xlabel()
    legend = ax.get_legend()
    assert legend is not None
    labels = " ".join(t.get_text() for t in legend.get_texts())
    for stage in ("h2d_weights", "h2d_hidden", "h2d_kv", "d2h", "gpu_compute", "cpu_attention"):
        assert stage in labels
    assert fig._suptitle.get_text() == "tiny: N=4, mu=2"
    busy = [t.get_text() for t in ax.texts if t.get_text().startswith("busy")]
    assert len(busy) == 5
    assert ax.get_xlim()[0] == 0


def test_figure_accepts_trace_dicts_and_default_title():
    dicts = [s.__dict__ for s in synthetic_spans()]
    fig = vt.timeline_figure(dicts)
    assert fig._suptitle.get_text()
    assert len(fig.axes[0].get_yticklabels()) == 5


def test_busy_fractions_on_a_hand_made_example():
    spans = [Span("decode", "gpu_compute", "a", 0.0, 0.4),
             Span("decode", "gpu_compute", "b", 0.3, 0.6),       # overlaps a: union is 0..0.6
             Span("decode", "cpu_attention", "c", 0.5, 2.0),     # clipped to 0.5..1.0
             Span("decode", "h2d_hidden", "d", 0.1, 0.2),
             Span("decode", "h2d_kv", "e", 0.15, 0.35),          # same lane as d: union 0.1..0.35
             Span("decode", "d2h", "f", -1.0, -0.5),             # outside the window
             Span("decode", "h2d_weights", "g", 0.9, 1.0)]
    busy = vt.busy_fractions(spans, (0.0, 1.0))
    assert busy == pytest.approx({"H2D weights": 0.1, "H2D activations/KV": 0.25, "D2H": 0.0,
                                  "GPU compute": 0.6, "CPU attention": 0.5})
    assert vt.busy_fractions(spans, (0.0, 0.5))["GPU compute"] == pytest.approx(1.0)
    fig = vt.timeline_figure(spans, window=(0.0, 1.0))
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"busy 60%", "busy 50%", "busy 25%", "busy 10%", "busy 0%"} <= texts
    assert fig.axes[0].get_xlim() == pytest.approx((0, 1000))


def test_default_window_is_a_few_layers_in_the_middle_of_decode():
    spans = synthetic_spans(layers=4, steps=10, mbs=3)
    t0, t1 = vt.default_window(spans)
    decode = [s for s in spans if s.phase == "decode"]
    start, end = decode[0].start_s, max(s.end_s for s in decode)
    assert start < t0 < t1 < end
    mid = (start + end) / 2
    assert t0 <= mid + (end - start) * 0.1 and t1 >= mid - (end - start) * 0.1
    inside = [s for s in decode if s.end_s > t0 and s.start_s < t1]
    visits = {vt._visit(s.label) for s in inside if s.stage == "gpu_compute"}
    assert 2 <= len(visits) <= 2 * 4 and len(inside) <= 2 * vt.MAX_BARS
    # each visit is 18 ms here: the window is whole visits
    assert ((t1 - t0) / 18e-3) == pytest.approx(round((t1 - t0) / 18e-3))


def test_default_window_without_visit_labels():
    spans = [Span("decode", "gpu_compute", "", i * 1e-3, i * 1e-3 + 5e-4) for i in range(1000)]
    t0, t1 = vt.default_window(spans)
    assert 0 < t0 < t1 < 1.0
    assert sum(1 for s in spans if t0 <= s.start_s < t1) <= vt.MAX_BARS


def test_load_trace_round_trip(tmp_path):
    spans = synthetic_spans()
    path = tmp_path / "trace.json"
    path.write_text(json.dumps([s.__dict__ for s in spans]))       # what `run --trace` writes
    loaded = vt.load_trace(path)
    assert loaded == sorted(spans, key=lambda s: s.start_s)
    (tmp_path / "bad.json").write_text('[{"stage": "d2h"}]')
    with pytest.raises(ValueError):
        vt.load_trace(tmp_path / "bad.json")


def test_empty_spans_is_an_error():
    with pytest.raises(ValueError):
        vt.timeline_figure([])


def test_exported_lazily():
    import viz
    assert viz.timeline_figure is vt.timeline_figure and viz.load_trace is vt.load_trace
    assert "timeline_figure" in viz.__all__


TINY = {"model_type": "qwen2_moe", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 50, "num_experts": 3, "num_experts_per_tok": 2,
        "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "dtype": "float32"}


def test_run_cli_writes_timeline_png(tmp_path, capsys):
    pytest.importorskip("torch")
    from moe_lightning_cli.main import main
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    png, trace = tmp_path / "timeline.png", tmp_path / "trace.json"
    rc = main(["run", "--model", str(tmp_path / "config.json"), "--policy-json",
               '{"batch_size": 4, "micro_batch_size": 2, "weights_gpu_frac": 0.5}', "--gen-len", "4",
               "--prompt-len", "5", "--no-warmup", "--json", "--trace", str(trace), "--timeline", str(png)])
    assert rc == 0
    json.loads(capsys.readouterr().out)                # --json output stays pure JSON
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    from matplotlib.image import imread
    assert imread(png).shape[0] > 300
    spans = vt.load_trace(trace)
    assert any(s.phase == "decode" for s in spans)
    vt.timeline_figure(spans)                          # the trace file draws too
