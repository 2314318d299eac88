"""The text of docs/benchmarks.md, rendered from one run's results."""

from __future__ import annotations

from typing import Any

from bench.report import (
    IDLE_CPU_PERCENT,
    IDLE_RSS,
    L_COMMAND_SPEEDUP,
    L_RSS_PER_INPUT_BYTE,
    L_STEP_SPEEDUP,
    L_STEP_VS_COPY,
    S_LIVE_BEYOND_QUIET,
    TOOL_LABELS,
    TOOLS,
    MiB,
    _mib,
    _s,
    _verdict,
    _x,
    median,
    summary,
    targets,
)
from bench.sets import SETS, human_bytes


def render(results: dict[str, Any], plot_name: str) -> str:
    parts = [
        _head(results),
        _targets(results),
        _machine(results),
        _method(results),
        _sets(results, plot_name),
        _live(results),
        _idle(results),
        _profiles(results),
        _raw(results),
    ]
    return "\n".join(p for p in parts if p).rstrip() + "\n"


def _head(results: dict[str, Any]) -> str:
    machine = results["machine"]
    return f"""# Benchmarks

How fast and how lean `tfmerge build` and the daemon are, next to the two things they
replace or cannot beat: the naive merge (the hand-run script's `import_graph_def` into one
graph and `SavedModelBuilder`) and the copy floor (`cp -r` of the same bytes and an fsync).
Every number below comes from one run of the benchmark suite in `bench/` on
{machine["date"]}; regenerate this page with the command under [How to run](#how-to-run).
"""


def _targets(results: dict[str, Any]) -> str:
    lines = [
        "## Targets",
        "",
        (
            "Medians of the runs below, against targets that say what makes tfmerge worth"
            " running in place of the naive merge:"
        ),
        "",
        (
            f"- **Speed on L**, the largest set of a default run: the build step must beat the"
            f" naive merge by enough to matter ({L_STEP_SPEEDUP:g}x) and stay near the cost of"
            f" merely copying and syncing the same bytes (within {L_STEP_VS_COPY:g}x of the copy"
            f" floor); the whole command, TensorFlow's import included, must still be"
            f" {L_COMMAND_SPEEDUP:g}x faster than the naive script."
        ),
        (
            f"- **Memory on L**: the peak may grow by about one copy of the inputs"
            f" ({L_RSS_PER_INPUT_BYTE:g} x input bytes above the TensorFlow import), so that"
            " the host that serves the models can also merge them; the naive merge needs"
            " several copies."
        ),
        (
            "- **Time to live on S**: once the quiet period (a wait the daemon makes on purpose)"
            f" is over, the new version must be published within {S_LIVE_BEYOND_QUIET:g} s, so"
            " that an upload is served promptly."
        ),
        (
            f"- **The supervisor at idle** runs all day on the serving host, beside TensorFlow"
            f" Serving: under {IDLE_RSS // MiB} MiB resident, and next to no CPU (at most"
            f" {IDLE_CPU_PERCENT:g} % of a core)."
        ),
        "- **XL**, past the 2 GiB protobuf cap: the naive merge cannot publish it; tfmerge must.",
        "",
        "| Target | Measured | Verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {value} | {_verdict(ok)} |" for name, value, ok in targets(results)]
    if "XL" not in results["sets"]:
        lines.append(
            "| XL (3 x 1 GiB): naive cannot publish; tfmerge | not run: opt-in, `--sets XL` |"
            " not measured |"
        )
    return "\n".join(lines) + "\n"


def _machine(results: dict[str, Any]) -> str:
    m = results["machine"]
    return f"""## Machine

| | |
|---|---|
| Date | {m["date"]} |
| CPU | {m["nproc"]} x {m["cpu"]} (`nproc` = {m["nproc"]}) |
| Memory | {human_bytes(m["memory_bytes"])} |
| Kernel | Linux {m["kernel"]} |
| File system of `bench/.work` | {m["filesystem"]} |
| Python | {m["python"]} |
| TensorFlow | {m["tensorflow"]} |
| tfmerge | {m["tfmerge"]}, commit {m["commit"]} |
| Load average (1, 5, 15 min) | {_load(m.get("load_start"))} at the start,\
 {_load(m.get("load_end"))} at the end |
| Benchmark wall time | {_s(results.get("elapsed_seconds"), 0)} s |
"""


def _load(values: list[float] | None) -> str:
    return "—" if not values else ", ".join(f"{v:.2f}" for v in values)


def _method(results: dict[str, Any]) -> str:
    runs = results["runs"]
    sets = ", ".join(f"{n} ({SETS[n].describe()})" for n in SETS if n in results["sets"])
    xl = results["sets"].get("XL")
    xl_runs = "" if xl is None or len(xl["runs"]) == runs else f" ({len(xl['runs'])} for XL)"
    return f"""## How to run

```
{results["command"]}
```

`make bench` runs `python -m bench` with its defaults: sets S, M and L, 3 runs each, the
daemon measurements on S, this page rewritten. XL (3 x 1 GiB) is opt-in, as it needs about
3 GiB of disk for the inputs and far more memory than the others:
`.venv/bin/python -m bench --sets XL --runs 1 --no-live --out /tmp/xl.md`. The generated
inputs are kept in `bench/.work/sets/` (ignored by git) and reused while they are complete;
the raw results of each run are written next to them as JSON.

## Method

- **Inputs** ({sets}): frozen classifiers from `tests/graphgen.py`'s
  `write_big_dense` (float32 constants, about one input size per model), seed
  `{results["seed"]}`. Each model is declared with its input `x` and outputs `probs` and
  `classes`; tfmerge gets the declarations as `[[models]]` entries, the naive script the
  same list.
- **Runs**: {runs} per set{xl_runs}. In each run every tool is a child process of the
  harness, reaped with `os.wait4`, whose `ru_maxrss` is the peak resident memory of the
  child and of the descendants it waited for. The order of the three tools rotates from one
  run to the next. The inputs are in the page cache for all three (they were just generated
  or read), so the numbers are those of a warm cache, not of a cold disk.
- **Shared host**: the benchmark does not stop other work on the machine; the load averages
  in [Machine](#machine) and the spread in [Every run](#every-run) show how much there was.
- **Copy floor**: `sh -c 'cp -r SRC DST && sync DST/*'`: the same bytes copied and made
  durable with one fsync per file. Its build step is its whole command.
- **Naive merge** (`bench/naive_merge.py`): `import tensorflow`, then every graph through
  `tf.graph_util.import_graph_def(graph_def, name=signature)` into one `tf.Graph`, one
  `predict_signature_def` per model, `SavedModelBuilder.add_meta_graph_and_variables(sess,
  ["serve"], signature_def_map=…)` and `save()`, as the hand-run script did. It prints its
  build step: from after `import tensorflow` to after `save()`. It does not fsync its
  output and checks nothing.
- **tfmerge build**: `tfmerge build -c CONFIG` on a fresh `serving_dir` and `state_dir`. Its
  build step is `durations.total` of its `build_finished` log line (from after the TensorFlow
  import to the rename of the version: read and check every model, merge, verify, publish).
- **TensorFlow baselines**: a child that only runs `import tensorflow` (what the naive
  script imports) and one that only runs `import tfmerge.build.tfcore` (the part of TensorFlow a
  tfmerge build loads: its C++ runtime, used through the C API, and its protobufs), both
  measured in every run. Memory is reported as `baseline + k x input bytes`,
  `k = (peak - baseline) / input bytes`, each tool against its own baseline.
- **Published = source**: after every tfmerge run, `bench/check_published.py` loads the
  published version with `tf.compat.v1.saved_model.loader.load`, runs every signature on its
  probe and compares the outputs with those of the source frozen graph run alone by
  `tests/graphgen.py`'s `run_frozen`, within the numeric contract (docs/serving.md: dtype
  and shape the same, floats within their dtype's tolerance). The naive merge's output is
  checked the same way in the first run.
- **Medians** everywhere; ratios are ratios of medians.
"""


def _set_table(name: str, set_result: dict[str, Any]) -> str:
    s = summary(set_result)
    spec = SETS[name]
    lines = [
        (
            f"### {name}: {spec.describe()} ({human_bytes(set_result['input_bytes'])} in"
            f" {set_result['files']} files)"
        ),
        "",
        (
            "| | whole command (s) | build step (s) | peak RSS (MiB) | k | published"
            " | matches sources |"
        ),
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for tool in TOOLS:
        t = s[tool]
        k = "" if tool == "copy" else _s(t["k"])
        published = f"{t['ok']}/{t['runs']}"
        checked = t["checked"]
        if tool == "copy":
            equal = "—"
        elif not checked:
            equal = "not checked"
        else:
            good = sum(c["equal"] == c["signatures"] and not c["mismatches"] for c in checked)
            equal = f"{good}/{len(checked)} runs, {checked[0]['signatures']} signatures each"
        command, rss = _s(t["command"]), _mib(t["rss"])
        if t["ok"] == 0 and t["failed_command"] is not None:
            command = f"{_s(t['failed_command'])} (until it failed)"
            rss = f"{_mib(t['failed_rss'])} (until it failed)"
        lines.append(
            f"| {TOOL_LABELS[tool]} | {command} | {_s(t['step'])} | {rss}"
            f" | {k} | {published} | {equal} |"
        )
    lines.append(
        f"| `import tensorflow` | {_s(s['baseline_seconds'])} | — | {_mib(s['baseline_rss'])}"
        " | | | |"
    )
    if s["core_rss"] is not None:
        lines.append(
            f"| `import tfmerge.build.tfcore` | {_s(s['core_seconds'])} | — | {_mib(s['core_rss'])}"
            " | | | |"
        )
    lines.extend(
        f"\n{TOOL_LABELS[tool]} failed: `{error[:400]}`"
        for tool in ("naive", "tfmerge")
        for error in s[tool]["errors"]
    )
    return "\n".join(lines) + "\n"


def _sets(results: dict[str, Any], plot_name: str) -> str:
    names = [n for n in SETS if n in results["sets"]]
    if not names:
        return ""
    lines = ["## Merging a set", ""]
    lines += [_set_table(n, results["sets"][n]) for n in names]
    lines += [
        "### Ratios",
        "",
        (
            "| Set | build step: naive / tfmerge | build step: tfmerge / copy floor |"
            " whole command: naive / tfmerge | k tfmerge | k naive |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        s = summary(results["sets"][name])
        lines.append(
            f"| {name} | {_x(s['step_speedup'])} | {_x(s['step_vs_copy'])} |"
            f" {_x(s['command_speedup'])} | {_s(s['tfmerge']['k'])} | {_s(s['naive']['k'])} |"
        )
    lines += [
        "",
        (
            f"Targets on L: naive / tfmerge ≥ {L_STEP_SPEEDUP:g}x for the build step, tfmerge /"
            f" copy floor ≤ {L_STEP_VS_COPY:g}x, k ≤ {L_RSS_PER_INPUT_BYTE:g}. `k` is"
            " `(peak RSS - baseline) / input bytes`, each tool against the TensorFlow it"
            " imports (`import tensorflow` for the naive merge, `import tfmerge.build.tfcore` for"
            " tfmerge); on S it mostly measures TensorFlow's own working memory, not the inputs."
        ),
        *_budget(results),
        "",
        f"![Time and memory against input size]({plot_name})",
        "",
    ]
    return "\n".join(lines)


def _budget(results: dict[str, Any]) -> list[str]:
    """What the L targets leave for tfmerge, in seconds, next to what cannot be avoided."""
    large = results["sets"].get("L")
    if large is None:
        return []
    s = summary(large)
    naive_step, naive_command = s["naive"]["step"], s["naive"]["command"]
    if naive_step is None or naive_command is None:
        return []
    core = (
        ""
        if s["core_seconds"] is None
        else f" ({_s(s['core_seconds'])} s for the part tfmerge imports)"
    )
    return [
        "",
        (
            f"On L the targets leave tfmerge {naive_step / L_STEP_SPEEDUP:.2f} s for its build"
            f" step (naive / {L_STEP_SPEEDUP:g}) and {naive_command / L_COMMAND_SPEEDUP:.2f} s"
            f" for its whole command (naive / {L_COMMAND_SPEEDUP:g}); the copy floor alone takes"
            f" {_s(s['copy']['step'])} s and a process that only imports TensorFlow"
            f" {_s(s['baseline_seconds'])} s, its exit included{core}."
        ),
    ]


def _live(results: dict[str, Any]) -> str:
    live = results.get("live")
    if not live:
        return ""
    lines = [
        "## Time to live (the daemon, set S)",
        "",
        (
            "`tfmerge run` on an empty `frozen_dir` (`discover = true`, `quiet_seconds = "
            f"{live['quiet_seconds']:g}`); once it is ready (and, with `warm = true`, once its"
            " warm worker has imported TensorFlow and gone idle) the 50 files of S are copied"
            " in, one after the other. Time to live runs from the close of the last file to"
            " the timestamp of `version_published` (logged just after the rename); the quiet"
            " period is the daemon waiting on purpose and is subtracted."
            f" {len(live.get('cold', []))} runs per setting; each starts a fresh daemon."
        ),
        "",
        (
            "| `[worker] warm` | time to live (s) | beyond the quiet period (s)"
            " | close → settled (s) | settled → published (s)"
            " | check / merge / verify / publish (s) | supervisor RSS (MiB)"
            " | idle worker RSS (MiB) |"
        ),
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for mode in ("cold", "warm"):
        runs = live.get(mode) or []
        if not runs:
            continue

        def med(key: str, rows: list[dict[str, Any]] = runs) -> float | None:
            return median([r[key] for r in rows])

        phases = " / ".join(
            _s(median([r["durations"].get(p) for r in runs]))
            for p in ("check", "merge", "verify", "publish")
        )
        ttl = [r["ttl_seconds"] for r in runs]
        beyond = median([t - live["quiet_seconds"] for t in ttl])
        lines.append(
            f"| {'true' if mode == 'warm' else 'false'} | {_s(med('ttl_seconds'))}"
            f" ({min(ttl):.2f} to {max(ttl):.2f}) | {_s(beyond)}"
            f" | {_s(med('settled_seconds'))} | {_s(med('build_seconds'))} | {phases}"
            f" | {_mib(med('supervisor_rss_after'))} | {_mib(med('worker_idle_rss'))} |"
        )
    checked = live.get("checked") or {}
    if checked:
        verdicts = [
            f"warm = {'true' if mode == 'warm' else 'false'}: {c['equal']}/{c['signatures']}"
            f" signatures match their sources{_problems(c['mismatches'])}"
            for mode, c in checked.items()
        ]
        lines += ["", "Published version of the first run, checked: " + "; ".join(verdicts) + "."]
    cold, warm = live.get("cold") or [], live.get("warm") or []
    if cold and warm:
        gain = median([r["build_seconds"] for r in cold]) or 0.0
        gain -= median([r["build_seconds"] for r in warm]) or 0.0
        worker = median([r["worker_idle_rss"] for r in warm]) or 0.0
        lines += [
            "",
            (
                f"**What a warm worker buys**: it publishes {gain:.2f} s sooner after the quiet"
                " period (the worker's start and its TensorFlow import), and holds"
                f" {worker / MiB:,.0f} MiB resident in a second process while the daemon is"
                " idle."
            ),
        ]
    return "\n".join(lines) + "\n"


def _problems(mismatches: list[str]) -> str:
    return "" if not mismatches else " (" + "; ".join(mismatches[:3]) + ")"


def _idle(results: dict[str, Any]) -> str:
    idle = results.get("idle")
    if not idle:
        return ""
    helper = idle.get("helper_rss")
    helper_line = (
        ""
        if not helper
        else f"\nBeside it, multiprocessing's resource tracker (a child the `spawn` start"
        f" method keeps) holds {_mib(helper)} MiB; it is not counted above.\n"
    )
    cpu = f"{idle['cpu_seconds']:.2f} s ({idle['cpu_seconds'] / idle['seconds'] * 100:.2f} %)"
    row = " | ".join(
        [
            _mib(idle["rss_start"]),
            _mib(idle["rss_end"]),
            _mib(idle["rss_max"]),
            _mib(idle["hwm"]),
            str(idle["threads"]),
            cpu,
        ]
    )
    return f"""## The supervisor at idle

The daemon process alone (`warm = false`), started on the S project after its version was
published, so start-up finds nothing to build; then left idle for {idle["seconds"]:.0f} s.
RSS from `/proc/PID/status` (sampled every second), CPU from `utime + stime` of
`/proc/PID/stat`.

| RSS at start (MiB) | RSS at end (MiB) | max RSS (MiB) | VmHWM (MiB) | threads | CPU |
|---:|---:|---:|---:|---:|---:|
| {row} |
{helper_line}"""


def _profiles(results: dict[str, Any]) -> str:
    profiles = sorted(results.get("profiles") or [], key=lambda p: list(SETS).index(p["set"]))
    return "\n".join(_profile(p) for p in profiles)


def _profile(profile: dict[str, Any]) -> str:
    lines = [
        f"## Where `tfmerge build` spends it ({profile['set']})",
        "",
        (
            "`python -m bench.profile_build` runs the same build in one process with its steps"
            " wrapped from outside: inclusive wall time, the peak RSS of the process during the"
            " step (VmHWM reset on entry through `/proc/self/clear_refs`), RSS on first entry,"
            " and the peak of the Python heap (tracemalloc: protobuf and TensorFlow allocate"
            f" outside it). TensorFlow import: {profile['import_seconds']:.2f} s; build:"
            f" {profile['total_seconds']:.2f} s; peak RSS {_mib(profile['peak_rss'])} MiB."
        ),
        "",
        "| step | calls | seconds | peak RSS (MiB) | RSS before (MiB) | Python heap peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for step in profile["steps"]:
        indent = "&nbsp;&nbsp;" * step["depth"]
        lines.append(
            f"| {indent}{step['name']} | {step['calls']} | {step['seconds']:.2f} |"
            f" {_mib(step['peak_rss'])} | {_mib(step['rss_before'])} | {_mib(step['py_peak'])} |"
        )
    if profile.get("missing_steps"):
        lines += ["", "Steps not found in this engine: " + ", ".join(profile["missing_steps"])]
    return "\n".join(lines) + "\n"


def _raw(results: dict[str, Any]) -> str:
    lines = ["## Every run", "", "<details><summary>Raw numbers</summary>", ""]
    lines += [
        "| set | run | tool | whole command (s) | build step (s) | peak RSS (MiB) | ok |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for name in SETS:
        set_result = results["sets"].get(name)
        if set_result is None:
            continue
        for index, run in enumerate(set_result["runs"], 1):
            base = set_result["baseline"][index - 1]
            lines.append(
                f"| {name} | {index} | `import tensorflow` | {base['seconds']:.2f} | |"
                f" {_mib(base['peak_rss'])} | |"
            )
            if "core_seconds" in base:
                lines.append(
                    f"| {name} | {index} | `import tfmerge.build.tfcore` |"
                    f" {base['core_seconds']:.2f} | | {_mib(base['core_peak_rss'])} | |"
                )
            for tool in TOOLS:
                r = run[tool]
                ok = "yes" if r["ok"] else "no"
                lines.append(
                    f"| {name} | {index} | {TOOL_LABELS[tool]} | {r['command_seconds']:.2f} |"
                    f" {_s(r['build_seconds'])} | {_mib(r['peak_rss'])} | {ok} |"
                )
    live = results.get("live") or {}
    for mode in ("cold", "warm"):
        for index, r in enumerate(live.get(mode) or [], 1):
            lines.append(
                f"| S live, warm = {'true' if mode == 'warm' else 'false'} | {index} | daemon |"
                f" {r['ttl_seconds']:.2f} (time to live) | {r['build_seconds']:.2f} | | yes |"
            )
    lines += ["", "</details>", ""]
    return "\n".join(lines)
