"""docs/benchmarks.md and its plot, from the results of one ``python -m bench`` run."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.sets import SETS

MiB = 2**20
TOOL_LABELS = {"copy": "copy floor", "naive": "naive merge", "tfmerge": "tfmerge build"}
TOOLS = ("copy", "naive", "tfmerge")
# Targets, checked on medians; the Targets section of docs/benchmarks.md says why each matters.
# On L, the largest set of a default run: beat the naive merge by enough to matter, stay near
# the cost of copying the same bytes, and grow by about one copy of the inputs.
L_STEP_SPEEDUP = 5.0
L_STEP_VS_COPY = 3.0
L_COMMAND_SPEEDUP = 2.5
L_RSS_PER_INPUT_BYTE = 1.25
# An upload is served promptly once it has settled: the quiet period is the only long wait.
S_LIVE_BEYOND_QUIET = 1.5
# The supervisor runs all day on the serving host, beside TensorFlow Serving.
IDLE_RSS = 60 * MiB
IDLE_CPU_PERCENT = 0.5


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _runs(set_result: dict[str, Any], tool: str) -> list[dict[str, Any]]:
    return [run[tool] for run in set_result["runs"]]


def tool_median(set_result: dict[str, Any], tool: str, key: str, ok_only: bool = True) -> Any:
    return median([r[key] for r in _runs(set_result, tool) if r["ok"] or not ok_only])


def failed_median(set_result: dict[str, Any], tool: str, key: str) -> Any:
    """The median over failed runs only: how long and how much memory a failure took."""
    return median([r[key] for r in _runs(set_result, tool) if not r["ok"]])


def summary(set_result: dict[str, Any]) -> dict[str, Any]:
    """Medians and the ratios the targets are stated in."""
    out: dict[str, Any] = {
        "baseline_rss": median([b["peak_rss"] for b in set_result["baseline"]]),
        "baseline_seconds": median([b["seconds"] for b in set_result["baseline"]]),
        # Results saved before tfmerge imported only TensorFlow's core have no core baseline.
        "core_rss": median(
            [b["core_peak_rss"] for b in set_result["baseline"] if "core_peak_rss" in b]
        ),
        "core_seconds": median(
            [b["core_seconds"] for b in set_result["baseline"] if "core_seconds" in b]
        ),
    }
    for tool in TOOLS:
        runs = _runs(set_result, tool)
        out[tool] = {
            "ok": sum(r["ok"] for r in runs),
            "runs": len(runs),
            "command": tool_median(set_result, tool, "command_seconds"),
            "step": tool_median(set_result, tool, "build_seconds"),
            "rss": tool_median(set_result, tool, "peak_rss"),
            "errors": sorted({r["error"] for r in runs if r["error"]}),
            "failed_command": failed_median(set_result, tool, "command_seconds"),
            "failed_rss": failed_median(set_result, tool, "peak_rss"),
            "checked": [r["checked"] for r in runs if r.get("checked")],
        }
    naive, ours, copy = out["naive"], out["tfmerge"], out["copy"]
    out["step_speedup"] = _ratio(naive["step"], ours["step"])
    out["step_vs_copy"] = _ratio(ours["step"], copy["step"])
    out["command_speedup"] = _ratio(naive["command"], ours["command"])
    for tool in ("naive", "tfmerge"):
        rss = out[tool]["rss"]
        # Each tool against its own TensorFlow import: tfmerge's imports less than the naive's.
        base = out["core_rss"] if tool == "tfmerge" and out["core_rss"] is not None else None
        base = out["baseline_rss"] if base is None else base
        out[tool]["k"] = None if rss is None else (rss - base) / set_result["input_bytes"]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _s(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _mib(value: float | None) -> str:
    # Negative: not measurable (a step in a background thread shares the process's peak).
    return "—" if value is None or value < 0 else f"{value / MiB:,.0f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**missed**")


def _check(value: float | None, test: Callable[[float], bool]) -> bool | None:
    return None if value is None else test(value)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    large = results["sets"].get("L")
    if large is not None:
        s = summary(large)
        rows += [
            (
                f"L: build step ≥ {L_STEP_SPEEDUP:g}x faster than naive",
                _x(s["step_speedup"]),
                _check(s["step_speedup"], lambda v: v >= L_STEP_SPEEDUP),
            ),
            (
                f"L: build step within {L_STEP_VS_COPY:g}x of the copy floor",
                _x(s["step_vs_copy"]),
                _check(s["step_vs_copy"], lambda v: v <= L_STEP_VS_COPY),
            ),
            (
                f"L: whole `tfmerge build` ≥ {L_COMMAND_SPEEDUP:g}x faster than the naive script",
                _x(s["command_speedup"]),
                _check(s["command_speedup"], lambda v: v >= L_COMMAND_SPEEDUP),
            ),
            (
                f"L: peak RSS ≤ TF baseline + {L_RSS_PER_INPUT_BYTE:g} x input bytes",
                "baseline + " + _s(s["tfmerge"]["k"]) + " x input",
                _check(s["tfmerge"]["k"], lambda v: v <= L_RSS_PER_INPUT_BYTE),
            ),
        ]
    live = results.get("live") or {}
    for mode in ("cold", "warm"):
        runs = live.get(mode) or []
        if not runs:
            continue
        beyond = median([r["ttl_seconds"] - r["quiet_seconds"] for r in runs])
        label = "warm = true" if mode == "warm" else "warm = false"
        rows.append(
            (
                f"S: time to live ≤ {S_LIVE_BEYOND_QUIET:g} s beyond the quiet period ({label})",
                f"{_s(beyond)} s",
                _check(beyond, lambda v: v <= S_LIVE_BEYOND_QUIET),
            )
        )
    idle = results.get("idle")
    if idle:
        rows.append(
            (
                f"Supervisor idle: < {IDLE_RSS // MiB} MiB resident",
                f"{_mib(idle['rss_max'])} MiB",
                idle["rss_max"] < IDLE_RSS,
            )
        )
        rows.append(
            (
                "Supervisor idle: ~0 CPU",
                f"{idle['cpu_seconds']:.2f} s CPU in {idle['seconds']:.0f} s",
                idle["cpu_seconds"] / idle["seconds"] * 100 <= IDLE_CPU_PERCENT,
            )
        )
    xl = results["sets"].get("XL")
    if xl is not None:
        s = summary(xl)
        rows.append(
            (
                "XL: the naive merge cannot publish (2 GiB protobuf cap)",
                "failed" if s["naive"]["ok"] == 0 else f"published {s['naive']['ok']} time(s)",
                s["naive"]["ok"] == 0,
            )
        )
        rows.append(
            (
                "XL: tfmerge publishes",
                f"published {s['tfmerge']['ok']} of {s['tfmerge']['runs']}",
                s["tfmerge"]["ok"] == s["tfmerge"]["runs"],
            )
        )
    return rows


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SETS if n in results["sets"]]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = (
        ("build step (after the TensorFlow import)", "build_seconds", "seconds"),
        ("whole command (TensorFlow import included)", "command_seconds", "seconds"),
        ("peak resident memory", "peak_rss", "MiB"),
    )
    styles = {"copy": ("tab:gray", "s"), "naive": ("tab:red", "o"), "tfmerge": ("tab:blue", "^")}
    for axis, (title, key, unit) in zip(axes, panels, strict=True):
        for tool in TOOLS:
            xs, ys, labels = [], [], []
            for name in names:
                value = tool_median(results["sets"][name], tool, key)
                if value is None:
                    continue
                xs.append(results["sets"][name]["input_bytes"] / MiB)
                ys.append(value / MiB if unit == "MiB" else value)
                labels.append(name)
            colour, marker = styles[tool]
            axis.plot(xs, ys, marker=marker, color=colour, label=TOOL_LABELS[tool])
            for name in names:
                failed = failed_median(results["sets"][name], tool, key)
                if failed is None or tool_median(results["sets"][name], tool, key) is not None:
                    continue
                xs.append(results["sets"][name]["input_bytes"] / MiB)
                ys.append(failed / MiB if unit == "MiB" else failed)
                labels.append(f"{name}: failed")
                axis.plot(xs[-1:], ys[-1:], marker="x", color=colour, linestyle="none")
            for x, y, label in zip(xs, ys, labels, strict=True):
                axis.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if key == "peak_rss":
            baseline = median(
                [median([b["peak_rss"] for b in results["sets"][n]["baseline"]]) for n in names]
            )
            if baseline is not None:
                axis.axhline(
                    baseline / MiB, color="tab:green", linestyle=":", label="import tensorflow"
                )
            core = median(
                [
                    b["core_peak_rss"]
                    for n in names
                    for b in results["sets"][n]["baseline"]
                    if "core_peak_rss" in b
                ]
            )
            if core is not None:
                axis.axhline(
                    core / MiB, color="tab:blue", linestyle=":", label="import tfmerge.build.tfcore"
                )
        axis.set_xscale("log")
        axis.set_yscale("log")
        plain = mpl.ticker.FuncFormatter(lambda value, _position: f"{value:g}")
        for ticks in (axis.xaxis, axis.yaxis):
            ticks.set_major_formatter(plain)
            ticks.set_minor_formatter(mpl.ticker.NullFormatter())
        axis.set_xlabel("input size (MiB, log)")
        axis.set_ylabel(f"{unit} (median, log)")
        axis.set_title(title, fontsize=10)
        axis.grid(visible=True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    machine = results["machine"]
    figure.suptitle(
        f"tfmerge {machine['tfmerge']} vs naive merge vs copy floor — {machine['nproc']} x "
        f"{machine['cpu']}, TF {machine['tensorflow']}, {machine['date']}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
