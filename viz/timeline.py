"""A Gantt-style timeline of the CGOPipe pipeline from the spans a run recorded.

One lane per resource (H2D weight pages, H2D activations/KV, D2H, GPU compute, CPU attention), bars
coloured by stage, time in milliseconds from the start of a window, and each lane's busy fraction in
that window. The default window covers a few consecutive layer visits (a couple of decode steps on a
small model) in the middle of the decode phase, so the overlap of the weight pages, the offloads, the
GPU kernels and the CPU attention is visible rather than thousands of hairline bars.

Spans are `runtime.measure.Span` objects or the dicts `moe-lightning run --trace` writes (a JSON list of
{"phase", "stage", "label", "start_s", "end_s"}); labels look like "v9 L1 mb2" (layer visit 9 = decode
step 9 // L, layer 1, micro-batch 2) or "v10 p0-3" (weight pages 0..3 loaded for visit 10).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from .style import RESOURCE_COLORS, new_figure

MS = 1e3

# (lane name, stages drawn in it), top to bottom
LANES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("H2D weights", ("h2d_weights",)),
    ("H2D activations/KV", ("h2d_hidden", "h2d_kv")),
    ("D2H", ("d2h",)),
    ("GPU compute", ("gpu_compute",)),
    ("CPU attention", ("cpu_attention",)),
)
STAGE_COLORS = {
    "h2d_weights": RESOURCE_COLORS["h2d_weights"],
    "h2d_hidden": RESOURCE_COLORS["h2d_act"],
    "h2d_kv": RESOURCE_COLORS["h2d_kv"],
    "d2h": RESOURCE_COLORS["d2h"],
    "gpu_compute": RESOURCE_COLORS["gpu"],
    "cpu_attention": RESOURCE_COLORS["cpu"],
}
STAGE_NAMES = {
    "h2d_weights": "CPU->GPU: weight pages (h2d_weights)",
    "h2d_hidden": "CPU->GPU: attention outputs / hidden (h2d_hidden)",
    "h2d_kv": "CPU->GPU: KV cache (h2d_kv)",
    "d2h": "GPU->CPU: q/k/v, KV, hidden (d2h)",
    "gpu_compute": "GPU compute (gpu_compute)",
    "cpu_attention": "CPU attention (cpu_attention)",
}
MAX_BARS = 120            # the automatic window holds about this many spans at most...
MAX_VISITS = 4            # ... and at most this many layer visits (fewer than two decode steps when L > 2)
MIN_BAR = 0.0025          # narrowest drawn bar, as a share of the window (busy fractions use true widths)
_VISIT = re.compile(r"^v(\d+)\b")
_LAYER_MB = re.compile(r"\bL(\d+)\s+mb(\d+)")


# ---- spans ---------------------------------------------------------------------------------------
def _span(s):
    if isinstance(s, dict):
        return SimpleNamespace(phase=s.get("phase", ""), stage=s["stage"], label=s.get("label", ""),
                               start_s=float(s["start_s"]), end_s=float(s["end_s"]))
    return s


def load_trace(path) -> list:
    """The spans of a trace written by `moe-lightning run --trace` (a JSON list of Span fields), as
    `runtime.measure.Span` objects, sorted by start time."""
    from runtime.measure import Span
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):          # tolerate {"spans": [...]}
        data = data.get("spans", [])
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of spans")
    spans = []
    for i, d in enumerate(data):
        try:
            spans.append(Span(str(d.get("phase", "")), str(d["stage"]), str(d.get("label", "")),
                              float(d["start_s"]), float(d["end_s"])))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: span {i} is not a span ({exc!r})") from None
    return sorted(spans, key=lambda s: s.start_s)


def _visit(label: str) -> int | None:
    m = _VISIT.match(label or "")
    return int(m.group(1)) if m else None


def _num_layers(spans) -> int | None:
    layers = [int(m.group(1)) for s in spans if (m := _LAYER_MB.search(s.label or ""))]
    return max(layers) + 1 if layers else None


# ---- window and busy fractions -------------------------------------------------------------------
def default_window(spans, phase: str = "decode") -> tuple[float, float]:
    """A window of a few consecutive layer visits in the middle of `phase`: from the first GPU-compute
    span of one visit to the first of the visit after the last one shown. As many visits as fit in
    about MAX_BARS spans, at least two, at most MAX_VISITS and two decode steps (2 x layers). Without
    visit labels: the middle MAX_BARS spans of the phase."""
    spans = [_span(s) for s in spans]
    in_phase = sorted((s for s in spans if s.phase == phase), key=lambda s: s.start_s) or \
        sorted(spans, key=lambda s: s.start_s)
    if not in_phase:
        raise ValueError("no spans to draw")
    per_visit: dict[int, list] = {}
    for s in in_phase:
        v = _visit(s.label)
        if v is not None and s.stage != "h2d_weights":       # pages carry the visit they are loaded for
            per_visit.setdefault(v, []).append(s)
    starts = {v: min(s.start_s for s in ss if s.stage == "gpu_compute")
              for v, ss in per_visit.items() if any(s.stage == "gpu_compute" for s in ss)}
    visits = sorted(starts)
    if len(visits) >= 1:
        layers = _num_layers(in_phase) or 1
        per = max(1.0, sum(len(per_visit[v]) for v in visits) / len(visits))
        k = int(max(2, min(2 * layers, MAX_VISITS, MAX_BARS // per)))
        k = min(k, len(visits))
        first = max(0, len(visits) // 2 - k // 2)
        first = min(first, len(visits) - k)
        shown = visits[first:first + k]
        t0 = starts[shown[0]]
        if first + k < len(visits):
            t1 = starts[visits[first + k]]
        else:
            t1 = max(s.end_s for v in shown for s in per_visit[v])
        if t1 > t0:
            return t0, t1
    m = min(len(in_phase), MAX_BARS)
    a = max(0, len(in_phase) // 2 - m // 2)
    chunk = in_phase[a:a + m]
    t0, t1 = chunk[0].start_s, max(s.end_s for s in chunk)
    if t1 <= t0:
        t1 = t0 + 1e-6
    return t0, t1


def _union_length(intervals) -> float:
    total, cur_a, cur_b = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_b is None or a > cur_b:
            if cur_b is not None:
                total += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    if cur_b is not None:
        total += cur_b - cur_a
    return total


def busy_fractions(spans, window: tuple[float, float], phase: str | None = None) -> dict[str, float]:
    """Per lane: the fraction of the window during which at least one of its spans runs (overlapping
    spans in a lane count once; spans are clipped to the window). `phase` keeps only that phase."""
    t0, t1 = window
    if t1 <= t0:
        raise ValueError(f"empty window {window}")
    out = {}
    for lane, stages in LANES:
        iv = [(max(s.start_s, t0), min(s.end_s, t1)) for s in map(_span, spans)
              if s.stage in stages and (phase is None or s.phase == phase)
              and s.end_s > t0 and s.start_s < t1]
        out[lane] = _union_length([(a, b) for a, b in iv if b > a]) / (t1 - t0)
    return out


def _pct(f: float) -> str:
    p = 100 * f
    return "0%" if p == 0 else f"{p:.2g}%" if p < 10 else f"{p:.0f}%"


# ---- figure --------------------------------------------------------------------------------------
def timeline_figure(spans, *, phase: str = "decode", window: tuple[float, float] | None = None,
                    title: str | None = None):
    """Gantt chart of `spans` (Span objects or trace dicts) in `window` = (t0_s, t1_s), seconds since the
    recorder started; by default a few layer visits in the middle of `phase` (see `default_window`).
    `title` (e.g. the model and policy) heads the figure. Returns a matplotlib Figure."""
    from matplotlib.patches import Patch

    spans = [_span(s) for s in spans]
    if not spans:
        raise ValueError("timeline: no spans (was the run recorded?)")
    t0, t1 = window if window is not None else default_window(spans, phase)
    t0, t1 = float(t0), float(t1)
    if t1 <= t0:
        raise ValueError(f"timeline: empty window ({t0}, {t1})")
    shown = [s for s in spans if s.phase == phase and s.end_s > t0 and s.start_s < t1]
    busy = busy_fractions(shown, (t0, t1))
    width_ms = (t1 - t0) * MS

    fig = new_figure(13, 5.4)
    ax = fig.add_subplot()
    lane_h = 0.72
    present = set()
    for y, (lane, stages) in enumerate(LANES):
        sub = [st for st in stages if any(s.stage == st for s in shown)] or list(stages[:1])
        h = lane_h / len(sub)
        for i, st in enumerate(sub):
            bars = [((max(s.start_s, t0) - t0) * MS, (min(s.end_s, t1) - max(s.start_s, t0)) * MS, s)
                    for s in shown if s.stage == st]
            if not bars:
                continue
            present.add(st)
            bottom = y - lane_h / 2 + i * h
            narrow = MIN_BAR * width_ms
            wide = [(x, w) for x, w, _ in bars if w >= 4 * narrow]
            thin = [(x, max(w, narrow)) for x, w, _ in bars if w < 4 * narrow]
            if wide:                         # white edges separate back-to-back bars
                ax.broken_barh(wide, (bottom, h), facecolors=STAGE_COLORS[st], edgecolors="white", linewidth=0.6)
            if thin:                         # short transfers: at least MIN_BAR wide, no edge eating them
                ax.broken_barh(thin, (bottom, h), facecolors=STAGE_COLORS[st], linewidth=0)
            for x, w, s in bars:             # name the micro-batch (and layer) on the wide bars
                if w < 0.022 * width_ms:
                    continue
                m = _LAYER_MB.search(s.label or "")
                text = (f"L{m.group(1)} mb{m.group(2)}" if w >= 0.035 * width_ms else f"mb{m.group(2)}") if m \
                    else (s.label.split(" ", 1)[1] if st == "h2d_weights" and " " in (s.label or "") else "")
                if text:
                    ax.text(x + w / 2, bottom + h / 2, text, ha="center", va="center", fontsize=7,
                            color="white", clip_on=True)
        ax.text(1.005, y, f"busy {_pct(busy[lane])}", transform=ax.get_yaxis_transform(),
                va="center", ha="left", fontsize=9, weight="bold")

    # layer-visit boundaries: where each visit's first GPU kernel starts
    layers = _num_layers(spans)
    firsts: dict[int, float] = {}
    for s in spans:
        v = _visit(s.label)
        if v is not None and s.phase == phase and s.stage == "gpu_compute":
            firsts[v] = min(firsts.get(v, s.start_s), s.start_s)
    marks = sorted((t, v) for v, t in firsts.items() if t0 <= t < t1)
    if len(marks) <= 24:
        for t, v in marks:
            x = (t - t0) * MS
            ax.axvline(x, color="0.35", ls=":", lw=0.9, zorder=0)
            name = f"layer {v % layers}, step {v // layers}" if layers else f"visit {v}"
            ax.text(x, -0.62, f" {name}", fontsize=7.5, color="0.25", va="bottom", ha="left", rotation=0)

    ax.set_yticks(range(len(LANES)), [lane for lane, _ in LANES])
    ax.set_ylim(len(LANES) - 0.5, -0.75)
    ax.set_xlim(0, width_ms)
    ax.set_xlabel(f"time from the window start (ms); window = {t0 * MS:,.2f} to {t1 * MS:,.2f} ms "
                  f"after the recorder started")
    ax.grid(axis="x", color="0.9", lw=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    handles = [Patch(color=STAGE_COLORS[st], label=STAGE_NAMES[st]) for _, stages in LANES for st in stages
               if st in present]
    if not handles:
        handles = [Patch(color=STAGE_COLORS[st], label=STAGE_NAMES[st]) for _, stages in LANES for st in stages]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8,
              frameon=False)
    head = title or "CGOPipe timeline"
    fig.suptitle(head, fontsize=12, weight="bold")
    ax.set_title(f"{phase}: {len(shown)} spans in a {width_ms:.3g} ms window "
                 f"(busy: share of the window each lane is occupied)", fontsize=9.5)
    return fig
