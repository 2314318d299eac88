"""The scale section of docs/benchmarks.md and its plot, from a ``python -m bench.scale`` run."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

START = "<!-- scale:start (written by python -m bench.scale; edits here are overwritten) -->"
END = "<!-- scale:end -->"
MiB = 2**20
#: Targets on medians: N500's one-model rebuild against its full build step, N500's whole
#: command and build step against the naive merge's, the build step's growth from N100 to
#: N1000 against N's, the daemon's time to live beyond the quiet period on N500, and REAL's
#: whole command and build step against the naive merge's.
REBUILD_SHARE = 0.15
MANY_COMMAND_SPEEDUP = 2.0
LIVE_BEYOND_QUIET = 2.0
REAL_COMMAND_SPEEDUP = 2.0
REAL_STEP_SPEEDUP = 3.0


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _runs(result: dict[str, Any], tool: str, key: str) -> float | None:
    return _median([r[tool].get(key) for r in result["runs"] if tool in r and r[tool].get("ok")])


def _loaded(result: dict[str, Any], tool: str, key: str) -> float | None:
    return _median([r[f"{tool}_load"].get(key) for r in result["runs"] if f"{tool}_load" in r])


def summary(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"count": result["count"], "input_bytes": result["input_bytes"]}
    for tool in ("tfmerge", "rebuild", "naive"):
        out[tool] = {
            "command": _runs(result, tool, "command_seconds"),
            "cpu": _runs(result, tool, "cpu_seconds"),
            "step": _runs(result, tool, "build_seconds"),
            "rss": _runs(result, tool, "peak_rss"),
            "ok": sum(bool(r.get(tool, {}).get("ok")) for r in result["runs"]),
        }
    for tool in ("tfmerge", "naive"):
        out[f"{tool}_load"] = {
            key: _loaded(result, tool, key)
            for key in (
                "load_seconds",
                "load_cpu_seconds",
                "peak_rss",
                "first_requests_seconds",
                "first_requests_no_grappler_seconds",
                "one_call_seconds",
            )
        }
    reused = [r.get("rebuild", {}).get("stats", {}).get("checks_reused") for r in result["runs"]]
    out["reused"] = _median([r for r in reused if r is not None])
    out["load"] = _median([r["load"] for r in result["runs"]])
    checked = [r["checked"] for r in result["runs"] if "checked" in r]
    out["checked"] = checked[0] if checked else None
    return out


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return None if top is None or bottom is None or bottom == 0 else top / bottom


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    sets = {name: summary(r) for name, r in results["sets"].items()}
    if "N500" in sets:
        n = sets["N500"]
        share = _ratio(n["rebuild"]["step"], n["tfmerge"]["step"])
        rows.append(
            (
                f"N500: one-model rebuild ≤ {REBUILD_SHARE} x the full build step",
                _x(share),
                None if share is None else share <= REBUILD_SHARE,
            )
        )
        speedup = _ratio(n["naive"]["command"], n["tfmerge"]["command"])
        rows.append(
            (
                f"N500: whole command ≥ {MANY_COMMAND_SPEEDUP:g}x faster than naive",
                _x(speedup),
                None if speedup is None else speedup >= MANY_COMMAND_SPEEDUP,
            )
        )
        step = _ratio(n["naive"]["step"], n["tfmerge"]["step"])
        rows.append(
            ("N500: build step no slower than naive", _x(step), None if step is None else step >= 1)
        )
    if "N100" in sets and "N1000" in sets:
        growth = _ratio(sets["N1000"]["tfmerge"]["step"], sets["N100"]["tfmerge"]["step"])
        models = sets["N1000"]["count"] / sets["N100"]["count"]
        rows.append(
            (
                f"N100 -> N1000: build step grows no faster than N ({models:g}x)",
                _x(growth),
                None if growth is None else growth <= models,
            )
        )
    live = [r["beyond_quiet"] for r in results.get("live", [])]
    if live:
        value = statistics.median(live)
        rows.append(
            (
                f"N500 daemon: one replaced model live ≤ {LIVE_BEYOND_QUIET:g} s beyond quiet",
                f"{value:.2f} s",
                value <= LIVE_BEYOND_QUIET,
            )
        )
    if "REAL" in sets:
        real = sets["REAL"]
        command = _ratio(real["naive"]["command"], real["tfmerge"]["command"])
        step = _ratio(real["naive"]["step"], real["tfmerge"]["step"])
        rows.append(
            (
                f"REAL: whole command ≥ {REAL_COMMAND_SPEEDUP:g}x faster than naive",
                _x(command),
                None if command is None else command >= REAL_COMMAND_SPEEDUP,
            )
        )
        rows.append(
            (
                f"REAL: build step ≥ {REAL_STEP_SPEEDUP:g}x faster than naive",
                _x(step),
                None if step is None else step >= REAL_STEP_SPEEDUP,
            )
        )
    return rows


_HEADER = " | ".join(
    (
        "| N", "load", "tfmerge whole", "tfmerge step", "tfmerge CPU", "rebuild whole",
        "rebuild step", "rebuild / step", "checks reused", "naive whole", "naive step",
        "naive CPU", "naive / tfmerge (whole)", "published = sources |",
    )
)  # fmt: skip


def _para(text: str) -> str:
    """A paragraph written over several source lines, as one line."""
    return " ".join(text.split())


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _s(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MiB:,.0f}"


def _slope(points: Sequence[tuple[int, float | None]]) -> float | None:
    """Least squares seconds per model over the points given."""
    known = [(n, v) for n, v in points if v is not None]
    if len(known) < 2:
        return None
    mean_n = statistics.fmean(n for n, _ in known)
    mean_v = statistics.fmean(v for _, v in known)
    spread = sum((n - mean_n) ** 2 for n, _ in known)
    return sum((n - mean_n) * (v - mean_v) for n, v in known) / spread if spread else None


def render(results: dict[str, Any], plot_name: str) -> str:
    sets = {name: summary(r) for name, r in results["sets"].items()}
    many = sorted((s for n, s in sets.items() if n != "REAL"), key=lambda s: s["count"])
    machine = results["machine"]
    load_end = machine.get("load_end", machine["load_start"])[0]
    lines = [
        START,
        "## Many models, real architectures, and the server's side",
        "",
        _para(
            f"""Measured with `.venv/bin/{results["command"]}` on {machine["date"]},
            {results["runs"]} runs per set, medians; tfmerge and the naive merge take turns to
            go first. Load average (1 min) {machine["load_start"][0]:.2f} at the start and
            {load_end:.2f} at the end: the host is shared, and the 1-minute load
            as each run began is in the tables. The many-models sets are bench/manyset.py's: N
            distinct frozen graphs of about 110 KiB (MLPs and small conv nets, every model
            declared in the config), the set of N being the first N models of the largest. REAL
            is bench/fieldset.py's: MobileNetV2, ResNet50, EfficientNetB0 and DenseNet121 with
            random weights, a text LSTM with a lookup table, a Transformer block and a TF1 GRU."""
        ),
        "",
        "| Target | Measured | Verdict |",
        "|---|---|---|",
    ]
    for name, value, ok in targets(results):
        verdict = "—" if ok is None else "**met**" if ok else "**missed**"
        lines.append(f"| {name} | {value} | {verdict} |")
    lines += [
        "",
        f"![Build, rebuild and load time against the number of models]({plot_name})",
        "",
        "### Build and one-model rebuild",
        "",
        _para(
            """A full build starts from an empty state folder. The rebuild follows it with one
            model replaced by one of other weights (same interface), the state kept:
            every other model's check is reused from `state_dir/checks`, and the
            merged model is still loaded and every signature run. The naive merge
            has no state: a change means a full merge, so its full build is its
            rebuild. Times in seconds; *step* is the build step (after the
            TensorFlow import), *whole* the command, *CPU* the user and system CPU
            time of the whole command (its processes' threads together; unlike wall
            time, hardly changed by what else the host runs)."""
        ),
        "",
        _HEADER,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in [*many, *([sets["REAL"]] if "REAL" in sets else [])]:
        checked = s["checked"]
        equal = "—" if checked is None else f"{checked['equal']}/{checked['signatures']}"
        label = "REAL" if s is sets.get("REAL") else f"{s['count']:,}"
        lines.append(
            f"| {label} | {_s(s['load'])} | {_s(s['tfmerge']['command'])} "
            f"| {_s(s['tfmerge']['step'])} | {_s(s['tfmerge']['cpu'])} "
            f"| {_s(s['rebuild']['command'])} "
            f"| {_s(s['rebuild']['step'])} "
            f"| {_x(_ratio(s['rebuild']['step'], s['tfmerge']['step']))} "
            f"| {'—' if s['reused'] is None else int(s['reused'])} "
            f"| {_s(s['naive']['command'])} | {_s(s['naive']['step'])} "
            f"| {_s(s['naive']['cpu'])} "
            f"| {_x(_ratio(s['naive']['command'], s['tfmerge']['command']))} | {equal} |"
        )
    lines += ["", *_growth(many), "", *_serving(many), "", *_live(results), END]
    return "\n".join(lines) + "\n"


def _growth(many: list[dict[str, Any]]) -> list[str]:
    wide = [s for s in many if s["count"] >= 100]
    if len(wide) < 2:
        return []

    def per_model(getter: Callable[[dict[str, Any]], float | None], unit: str = "ms") -> str:
        slope = _slope([(s["count"], getter(s)) for s in wide])
        scale = 1000 if unit == "ms" else 1
        return "—" if slope is None else f"{slope * scale:.2f} {unit}"

    first, last = wide[0], wide[-1]
    return [
        "### What each additional model costs",
        "",
        (
            f"Least-squares slopes from N = {first['count']} to N = {last['count']} (seconds per "
            "model, medians):"
        ),
        "",
        "| | tfmerge | naive merge |",
        "|---|---:|---:|",
        (
            f"| full build step | {per_model(lambda s: s['tfmerge']['step'])} "
            f"| {per_model(lambda s: s['naive']['step'])} |"
        ),
        (
            f"| one-model rebuild step | {per_model(lambda s: s['rebuild']['step'])} "
            f"| {per_model(lambda s: s['naive']['step'])} (a full merge) |"
        ),
        (
            f"| whole command, CPU time | {per_model(lambda s: s['tfmerge']['cpu'])} "
            f"| {per_model(lambda s: s['naive']['cpu'])} |"
        ),
        (
            f"| whole command | {per_model(lambda s: s['tfmerge']['command'])} "
            f"| {per_model(lambda s: s['naive']['command'])} |"
        ),
        (
            f"| load by TensorFlow Serving's loader | "
            f"{per_model(lambda s: s['tfmerge_load']['load_seconds'])} "
            f"| {per_model(lambda s: s['naive_load']['load_seconds'])} |"
        ),
        "| peak memory of that load | {} | {} |".format(
            per_model(lambda s: _in_mib(s["tfmerge_load"]), "MiB"),
            per_model(lambda s: _in_mib(s["naive_load"]), "MiB"),
        ),
    ]


def _in_mib(load: dict[str, Any]) -> float | None:
    value = load.get("peak_rss")
    return None if value is None else value / MiB


def _serving(many: list[dict[str, Any]]) -> list[str]:
    loaded = [s for s in many if s["tfmerge_load"]["load_seconds"] is not None]
    if not loaded:
        return []
    lines = [
        "### The server's side: loading a version of many signatures",
        "",
        _para(
            """Each version loaded in a fresh process by `TF_LoadSessionFromSavedModel` (the
            C++ loader TensorFlow Serving runs, bench/serveload.py) under TensorFlow's default
            session options, as the server loads it; then every signature run once, one request
            each (what the warmup replay, and without it the first request of each signature,
            does); then every signature in one call."""
        ),
        "",
        _SERVING_HEADER,
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in loaded:
        for tool in ("tfmerge", "naive"):
            load = s[f"{tool}_load"]
            first = load["first_requests_seconds"]
            lines.append(
                f"| {s['count']:,} | {tool} | {_s(load['load_seconds'])} "
                f"| {_s(load['load_cpu_seconds'])} "
                f"| {_ms(load['load_cpu_seconds'], s['count'])} | {_mib(load['peak_rss'])} "
                f"| {_s(first)} | {_ms(first, s['count'])} "
                f"| {_ms(load.get('first_requests_no_grappler_seconds'), s['count'])} "
                f"| {_s(load['one_call_seconds'])} |"
            )
    first, last = loaded[0], loaded[-1]
    per_first = _ratio(first["tfmerge_load"]["first_requests_seconds"], first["count"])
    per_last = _ratio(last["tfmerge_load"]["first_requests_seconds"], last["count"])
    load_growth = _x(
        _ratio(last["tfmerge_load"]["load_cpu_seconds"], first["tfmerge_load"]["load_cpu_seconds"])
    )
    rss_growth = _x(_ratio(last["tfmerge_load"]["peak_rss"], first["tfmerge_load"]["peak_rss"]))
    lines += [
        "",
        _para(
            f"""From N = {first["count"]:,} to N = {last["count"]:,} ({
                last["count"] // first["count"]
            }x the
            models) the load's CPU time grows {load_growth} and its peak memory {
                rss_growth
            }: the graph is
            read, converted and imported once, whatever it holds. The first request of each
            signature grows otherwise: its cost per signature grows {
                _x(_ratio(per_last, per_first))
            }, so that warming up every signature costs in proportion to the square
            of their number. The reason is TensorFlow's session, not the layout of the version
            (the naive merge's version behaves the same): a session builds one executor per
            distinct set of feeds and fetches, and for each it copies the whole graph, prunes
            the copy to what the call needs and, under the default options TensorFlow Serving
            uses, runs Grappler over it, whose passes see the whole graph. Every signature's
            first request (or warmup record) therefore pays for all the models of the version.
            Most of it is Grappler's: with it off (`disable_meta_optimizer`, which TensorFlow
            Serving takes in the `session_config` of its `--platform_config_file`, at the price
            of Grappler's optimisations for every request) a first request costs what the
            "without Grappler" column shows, the copy and prune that remain. One call for every
            signature (a MultiInference request) pays for the whole graph once."""
        ),
    ]
    return lines


_SERVING_HEADER = " | ".join(
    (
        "| N", "tool", "load (s)", "load CPU (s)", "load CPU per model (ms)", "peak RSS (MiB)",
        "first request of every signature (s)", "per signature (ms)",
        "per signature, without Grappler (ms)", "all in one call (s) |",
    )
)  # fmt: skip


def _ms(seconds: float | None, count: int) -> str:
    return "—" if seconds is None else f"{1000 * seconds / count:.1f}"


def _live(results: dict[str, Any]) -> list[str]:
    live = results.get("live") or []
    if not live:
        return []
    return [
        "### Time to live with 500 models",
        "",
        (
            "`tfmerge run` with a warm worker, serving N500 (every model discovered); one model's "
            "file is replaced (written aside and renamed into place). From the rename to "
            "`version_published`, and beyond the quiet period (2 s):"
        ),
        "",
        "| run | time to live (s) | beyond the quiet period (s) | build (s) | load |",
        "|---:|---:|---:|---:|---:|",
        *(
            f"| {i + 1} | {r['ttl_seconds']:.2f} | {r['beyond_quiet']:.2f} "
            f"| {r['build_seconds']:.2f} | {r['load']:.2f} |"
            for i, r in enumerate(live)
        ),
        "",
    ]


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted(
        (summary(r) for n, r in results["sets"].items() if n != "REAL"), key=lambda s: s["count"]
    )
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels: tuple[tuple[str, Callable[[dict[str, Any], str], float | None]], ...] = (
        ("full build step", lambda s, tool: s[tool]["step"]),
        (
            "rebuild after one model changed (naive: a full merge)",
            lambda s, tool: s["rebuild" if tool == "tfmerge" else "naive"]["step"],
        ),
        (
            "load by TensorFlow Serving's C++ loader",
            lambda s, tool: s[f"{tool}_load"]["load_seconds"],
        ),
    )
    styles = {"naive": ("tab:red", "o", "naive merge"), "tfmerge": ("tab:blue", "^", "tfmerge")}
    for axis, (title, value) in zip(axes, panels, strict=True):
        for tool, (colour, marker, label) in styles.items():
            points = [(s["count"], value(s, tool)) for s in sets]
            known = [(n, v) for n, v in points if v is not None]
            if known:
                axis.plot(*zip(*known, strict=True), marker=marker, color=colour, label=label)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("models (log)")
        axis.set_ylabel("seconds (median, log)")
        axis.set_title(title, fontsize=10)
        axis.grid(visible=True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    machine = results["machine"]
    figure.suptitle(
        f"tfmerge {machine['tfmerge']} vs naive merge, many small models — {machine['nproc']} x "
        f"{machine['cpu']}, TF {machine['tensorflow']}, {machine['date']}",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def keep_section(old: str, new: str) -> str:
    """new, with the scale section of old and what follows it (notes written by hand on its
    figures) appended when old had one (python -m bench rewrites the rest of the page)."""
    if START not in old or END not in old or START in new:
        return new
    section = START + old.split(START, 1)[1]
    return new.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"


def write(results: dict[str, Any], page: Path) -> None:
    """Replace the scale section of page (appended when it has none) and write the plot."""
    plot_path = page.with_name(f"{page.stem}-scale.png")
    plot(results, plot_path)
    section = render(results, plot_path.name)
    text = page.read_text() if page.exists() else ""
    if START in text and END in text:
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1]
        text = before + section.rstrip("\n") + after
    else:
        text = text.rstrip("\n") + "\n\n" + section
    page.write_text(text)
