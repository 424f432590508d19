"""The evaluation report: `write_report(evaluate(...), out_dir)` writes report.md (a summary with
pass / fail against thresholds, then a table per metric: lip sync, identity, face detail, colour
shift, seams, text control, routing), results.json (everything measured) and PNG plots: per
video the audio envelope against the measured mouth opening (`plot_lip_sync`, also used by
`make demo`), and identity similarity over time (`plot_identity`). Every file is written to a
temporary name in out_dir and renamed into place, so a reader never sees a partial file. Plots
need matplotlib (imported only here)."""

from __future__ import annotations

import io
import json
import math
import os
import re

import numpy as np

from mi_jax import atomic
from mi_jax.eval.metrics import best_offset_correlation


def _save_figure(fig, path: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return atomic.write_file(os.fspath(path), buffer.getvalue())


def _figure(width: float, height: float):
    # Figure without pyplot: no global state, no GUI backend, safe from any thread
    from matplotlib.figure import Figure  # local: matplotlib takes most of a second to import

    return Figure(figsize=(width, height), layout="constrained")


def plot_lip_sync(envelope: np.ndarray, mouth: np.ndarray, fps: float, path: str | os.PathLike,
                  title: str | None = None) -> str:
    """Plots the audio envelope against the mouth opening measured from pixels, over time.

    Each curve is scaled to [0, 1] for display (the mouth measure is uncalibrated); the title
    gives their best-offset correlation.

    Args:
      envelope: the audio envelope per frame, `[T]`.
      mouth: the mouth opening per frame, `[T]`.
      fps: frames per second (the time axis).
      path: the PNG to write.
      title: the plot's title (default None: the correlation alone).

    Returns:
      `path` as a string.
    """
    envelope, mouth = np.asarray(envelope, np.float64), np.asarray(mouth, np.float64)
    if envelope.shape != mouth.shape or envelope.ndim != 1 or len(envelope) < 3:
        raise ValueError(f"envelope and mouth must both be [T] with T >= 3, got {envelope.shape} and {mouth.shape}.")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}.")
    corr, offset = best_offset_correlation(envelope, mouth, min(5, len(envelope) - 3))
    span = lambda x: (x - x.min()) / (np.ptp(x) or 1.0)  # noqa: E731
    times = np.arange(len(envelope)) / fps
    fig = _figure(min(4 + times[-1] / 4, 24), 3)
    ax = fig.add_subplot()
    ax.plot(times, span(envelope), label="audio envelope", color="tab:blue", lw=1)
    ax.plot(times, span(mouth), label="mouth opening (pixels)", color="tab:orange", lw=1, alpha=0.85)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("scaled to [0, 1]")
    ax.set_xlim(0, times[-1])
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{title + ': ' if title else ''}lip sync r = {corr:.3f} at offset {offset:+d} frames", fontsize=10)
    return _save_figure(fig, path)


def plot_identity(series: dict[str, np.ndarray], fps: float, path: str | os.PathLike,
                  references: dict[str, np.ndarray] | None = None) -> str:
    """PNG at `path` of identity similarity over time: series maps a label to a [T] similarity
    (solid lines); references (optional, same labels) the renderer's, dashed in the same colour."""
    if not series:
        raise ValueError("plot_identity needs at least one series.")
    fig = _figure(8, 3.5)
    ax = fig.add_subplot()
    for k, (label, values) in enumerate(series.items()):
        colour = f"C{k % 10}"
        values = np.asarray(values, np.float64)
        ax.plot(np.arange(len(values)) / fps, values, label=label, lw=1.2, color=colour)
        if references and label in references:
            ref = np.asarray(references[label], np.float64)
            ax.plot(np.arange(len(ref)) / fps, ref, lw=0.8, ls="--", color=colour, alpha=0.7)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("similarity to the portrait")
    ax.legend(loc="lower left", fontsize=7, ncol=2)
    note = " (dashed: ground-truth renderer)" if references else ""
    ax.set_title(f"identity: 1 - mean |face - portrait| / 255, mouth excluded{note}", fontsize=9)
    return _save_figure(fig, path)


# ----------------------------------------------------------------------------- pass / fail


def check(results: dict, *, min_lip_sync_fraction: float = 0.6, max_lip_sync_offset: int = 2,
          min_face_detail: float = 0.7, max_colour_shift: float = 2.0, max_seam: float = 1.3,
          max_identity_drift: float = 0.10, min_routing_margin: float = 0.1,
          max_portrait_colour: float = 2.0) -> list[dict]:
    """The pass / fail table of `evaluate`'s results.

    Args:
      results: what `metrics.evaluate` returns.
      min_lip_sync_fraction: lip sync passes when the mean correlation is at least this fraction
        of the renderer's (default 0.6) ...
      max_lip_sync_offset: ... and every video's (and speaker's) best offset is within this many
        frames (default 2): a well-correlated mouth that lags the audio fails.
      min_face_detail: eye band edge energy as a fraction of the renderer's (default 0.7).
      max_colour_shift: the worst video's dE76, first vs last window (default 2.0).
      max_seam: the window-seam score (default 1.3).
      max_identity_drift: the relative identity drop, first vs last window (default 0.10).
      min_routing_margin: two-speaker routing margin (default 0.1).
      max_portrait_colour: the worst video's dE76 between the portrait and its first second
        (default 2.0).

    Returns:
      Rows `{metric, value, truth, ratio, threshold, passed, detail}`; `passed` is None for rows
      without a threshold, `detail` a note shown with the value (else None). Text control passes
      when nodding's vertical / horizontal variance ratio is > 1 and above the neutral prompt's
      (shaking head: < 1 and below).
    """
    summary, rows = results["summary"], []

    def row(metric, entry, threshold, passed, detail=None):
        rows.append({"metric": metric, "value": entry["value"], "truth": entry["truth"], "ratio": entry["ratio"],
                     "threshold": threshold, "passed": passed, "detail": detail})

    if summary["lip_sync"]:
        entry = summary["lip_sync"]
        offsets = entry["offsets"]
        row("lip-sync correlation", entry,
            f"ratio >= {min_lip_sync_fraction} and every |offset| <= {max_lip_sync_offset} frames",
            entry["ratio"] is not None and entry["ratio"] >= min_lip_sync_fraction
            and all(abs(k) <= max_lip_sync_offset for k in offsets),
            "offsets " + ", ".join(f"{k:+d}" for k in offsets) + " frames")
    if summary.get("syncnet"):
        row("SyncNet confidence", summary["syncnet"], "", None)
    if summary.get("face_detail"):
        entry = summary["face_detail"]
        row("face detail (eye band edge energy)", entry, f"ratio >= {min_face_detail}",
            entry["ratio"] is not None and entry["ratio"] >= min_face_detail)
    entry = summary["identity_drift"]
    row("identity drift (mean)", entry, f"<= {max_identity_drift:.0%}", entry["value"] <= max_identity_drift)
    entry = summary["colour_shift"]
    row("colour shift, first to last window (dE76, worst video)",
        {"value": entry["worst"], "truth": entry["truth_worst"], "ratio": None},
        f"<= {max_colour_shift:g} dE", entry["worst"] <= max_colour_shift)
    entry = summary["portrait_colour"]
    row("colour against the portrait, first second (dE76, worst video)",
        {"value": entry["worst"], "truth": entry["truth_worst"], "ratio": None},
        f"<= {max_portrait_colour:g} dE", entry["worst"] <= max_portrait_colour)
    if summary["seam"]:
        row("window-seam score", summary["seam"], f"<= {max_seam}", summary["seam"]["value"] <= max_seam)
    if summary.get("seam_over_latents"):  # a diagnosis, not a goal: is the seam the sampler's or the decoder's?
        row("window seams / other latent boundaries", summary["seam_over_latents"], "", None)
    control = summary["text_control"]
    neutral = control.get("neutral")
    if neutral:
        row("text control: neutral (vertical / horizontal)", neutral, "", None)
    for group, sign in (("nodding", 1), ("shaking head", -1)):
        if group in control:
            value = control[group]["value"]
            ok = sign * math.log(value) > 0 and (neutral is None or sign * (value - neutral["value"]) > 0)
            op = ">" if sign > 0 else "<"
            threshold = f"{op} 1" + (f" and {op} neutral" if neutral else "")
            row(f"text control: {group} (vertical / horizontal)", control[group], threshold, ok)
    if summary["routing"]:
        row("two-speaker routing margin (min)", summary["routing"], f">= {min_routing_margin}",
            summary["routing"]["value"] >= min_routing_margin)
    return rows


# ----------------------------------------------------------------------------- report


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "pass" if value else "**FAIL**"
    if isinstance(value, (int, np.integer)):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{100 * value:.1f} %" if percent else f"{value:.3g}" if abs(value) < 0.01 and value else f"{value:.3f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # a "|" inside a cell (e.g. |offset|) would end the cell: escape it
    return lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows] + [""]


def write_report(results: dict, out_dir: str | os.PathLike, *, min_lip_sync_fraction: float = 0.6,
                 max_lip_sync_offset: int = 2, min_face_detail: float = 0.7, max_colour_shift: float = 2.0,
                 max_seam: float = 1.3, max_identity_drift: float = 0.10, min_routing_margin: float = 0.1) -> str:
    """Writes the evaluation report: report.md, results.json and its plots.

    Args:
      results: what `metrics.evaluate` returns.
      out_dir: the folder (created if missing); gets report.md, results.json,
        lip_sync_<k>_<name>.png per video and identity.png.
      min_lip_sync_fraction: as `check` (default 0.6).
      max_lip_sync_offset: as `check` (default 2).
      min_face_detail: as `check` (default 0.7).
      max_colour_shift: as `check` (default 2.0).
      max_seam: as `check` (default 1.3).
      max_identity_drift: as `check` (default 0.10).
      min_routing_margin: as `check` (default 0.1).

    Returns:
      The path of report.md.
    """
    if not isinstance(results, dict) or not results.get("videos") or "summary" not in results:
        raise ValueError("results must be the dict returned by mi_jax.eval.metrics.evaluate (with videos and summary).")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    videos = results["videos"]
    checks = check(results, min_lip_sync_fraction=min_lip_sync_fraction, max_lip_sync_offset=max_lip_sync_offset,
                   min_face_detail=min_face_detail, max_colour_shift=max_colour_shift, max_seam=max_seam,
                   max_identity_drift=max_identity_drift, min_routing_margin=min_routing_margin)
    settings = results.get("settings", {})
    lines = ["# Evaluation report", "",
             f"{len(videos)} video(s): " + ", ".join(f"{v['name']} ({v['prompt'] or 'neutral'}, "
                                                     f"{v['video']['num_frames'] / v['fps']:.1f} s)" for v in videos)
             + ". Every metric is also measured on the ground-truth renderer's video of the same clip ('renderer').",
             f"Settings: {json.dumps(settings)}.", "", "## Summary", ""]
    lines += _table(["metric", "value", "renderer", "ratio", "threshold", "result"],
                    [[c["metric"],
                      _fmt(c["value"], "drift" in c["metric"]) + (f" ({c['detail']})" if c["detail"] else ""),
                      _fmt(c["truth"], "drift" in c["metric"]),
                      _fmt(c["ratio"]), c["threshold"] or "—",
                      "—" if c["passed"] is None else _fmt(bool(c["passed"]))]
                     for c in checks])

    lines += ["## Lip sync", "", "Pearson correlation of the audio envelope with the mouth opening measured "
              "from pixels, at the best offset (frames; > 0: the mouth lags the audio).", ""]
    rows = []
    for v in videos:
        for s, (gen, ref) in enumerate(zip(v["video"]["lip_sync"], v["truth"]["lip_sync"])):
            sync = ([_fmt(gen.get("syncnet_confidence")), _fmt(ref.get("syncnet_confidence"))]
                    if settings.get("syncnet") else [])
            rows.append([v["name"], s, _fmt(gen["correlation"]), gen["offset"], _fmt(ref["correlation"]), ref["offset"],
                         _fmt(gen["correlation"] / ref["correlation"] if ref["correlation"] else None), *sync])
    extra = ["SyncNet", "renderer SyncNet"] if settings.get("syncnet") else []
    lines += _table(["video", "speaker", "correlation", "offset", "renderer", "renderer offset", "ratio", *extra], rows)
    for k, v in enumerate(videos):
        name = f"lip_sync_{k:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', v['name'])}.png"
        plot_lip_sync(v["video"]["envelope_series"][0], v["video"]["mouth_series"][0], v["fps"],
                      os.path.join(out_dir, name), title=v["name"])
        lines += [f"![lip sync {v['name']}]({name})", ""]

    lines += ["## Identity", "",
              "Similarity of the face (mouth excluded) to the portrait: 1 - mean |difference| / 255; "
              "drift = relative drop of its mean from the first to the last window.", ""]
    lines += _table(["video", "window (s)", "first", "last", "drift", "renderer drift"],
                    [[v["name"], f"{v['video']['identity']['window_frames'] / v['fps']:.1f}",
                      _fmt(v["video"]["identity"]["first"]), _fmt(v["video"]["identity"]["last"]),
                      _fmt(v["video"]["identity"]["drift"], True), _fmt(v["truth"]["identity"]["drift"], True)]
                     for v in videos])
    labels = [f"{k}: {v['name']}" for k, v in enumerate(videos)]  # names may repeat
    plot_identity({label: v["video"]["identity_series"] for label, v in zip(labels, videos)}, videos[0]["fps"],
                  os.path.join(out_dir, "identity.png"),
                  references={label: v["truth"]["identity_series"] for label, v in zip(labels, videos)})
    lines += ["![identity similarity over time](identity.png)", ""]

    details = [v for v in videos if v["video"]["face_detail"] is not None]
    if details:
        lines += ["## Face detail", "", "Mean luma gradient magnitude (per pixel, 0-255 units) in the eye band "
                  "box, which follows the head: sharp eyes score like the renderer, a blurred or eyeless face far "
                  "lower.", ""]
        lines += _table(["video", "edge energy", "renderer", "ratio"],
                        [[v["name"], _fmt(v["video"]["face_detail"]), _fmt(v["truth"]["face_detail"]),
                          _fmt(v["video"]["face_detail"] / v["truth"]["face_detail"] if v["truth"]["face_detail"]
                               else None)] for v in details])

    lab = lambda c: "(" + ", ".join(f"{x:.1f}" for x in c) + ")"  # noqa: E731
    lines += ["## Colour shift", "", "dE76 between the mean CIE Lab colour (D65) of the face region in the first and "
              "the last window (a minute, or a third of a shorter video).", ""]
    lines += _table(["video", "window (s)", "first L, a, b", "last L, a, b", "dE76", "renderer dE76"],
                    [[v["name"], f"{v['video']['colour_shift']['window_frames'] / v['fps']:.1f}",
                      lab(v["video"]["colour_shift"]["first"]), lab(v["video"]["colour_shift"]["last"]),
                      _fmt(v["video"]["colour_shift"]["delta_e"]), _fmt(v["truth"]["colour_shift"]["delta_e"])]
                     for v in videos])

    seams = [v for v in videos if v["video"]["seam"] is not None]
    if seams:
        lines += ["## Window seams", "",
                  "Mean |frame difference| at window boundaries / elsewhere (1.0 = seamless). Every window "
                  "boundary is also a latent boundary: 'vs latents' divides by the change at the other latent "
                  "boundaries instead (about 1: the windows join as well as the latents inside a window, and "
                  "the score above is the decoder's change from latent to latent).", ""]
        lines += _table(["video", "score", "renderer", "ratio", "vs latents", "renderer vs latents"],
                        [[v["name"], _fmt(v["video"]["seam"]), _fmt(v["truth"]["seam"]),
                          _fmt(v["video"]["seam"] / v["truth"]["seam"] if v["truth"]["seam"] else None),
                          _fmt(v["video"].get("seam_over_latents")), _fmt(v["truth"].get("seam_over_latents"))]
                         for v in seams])

    lines += ["## Text control", "", "Variance (px²) of the head silhouette's centre of mass; nodding should move "
              "it vertically (ratio > 1), shaking head horizontally (ratio < 1).", ""]
    lines += _table(["video", "prompt", "vertical var", "horizontal var", "vertical / horizontal", "renderer ratio"],
                    [[v["name"], v["prompt"] or "(neutral)", _fmt(v["video"]["motion"]["vertical_var"]),
                      _fmt(v["video"]["motion"]["horizontal_var"]), _fmt(v["video"]["motion"]["ratio"]),
                      _fmt(v["truth"]["motion"]["ratio"])] for v in videos])

    pairs = [v for v in videos if v["video"]["routing"] is not None]
    if pairs:
        lines += ["## Two-speaker routing", "", "Each mouth's correlation with its own audio stream minus with the "
                  "other speaker's (> 0: routed correctly).", ""]
        rows = []
        for v in pairs:
            gen, ref = v["video"]["routing"], v["truth"]["routing"]
            rows += [[v["name"], s, _fmt(gen["correlations"][s][s]), _fmt(gen["correlations"][s][1 - s]),
                      _fmt(gen["margins"][s]), _fmt(ref["margins"][s])] for s in range(2)]
        lines += _table(["video", "speaker", "own stream", "other stream", "margin", "renderer margin"], rows)

    atomic.write_file(os.path.join(out_dir, "results.json"), json.dumps(results, indent=1).encode())
    return atomic.write_file(os.path.join(out_dir, "report.md"), "\n".join(lines).encode())
