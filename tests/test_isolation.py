"""One model's failure is that model's alone: crashes, memory, time, names.

Each poisoned graph (tests/poisongraphs.py) is dropped next to a good model; the good model is
published in the same build, and the poisoned one is refused by name, with its code. The
daemon test runs them all through one real `tfmerge run`, whose workers really crash.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tfmerge import cli, exitcodes

import graphgen
import poisongraphs
from daemonlib import DaemonProcess
from graphgen import FrozenModel
from projectlib import Project, model_entry, named, one, parse_events
from servinglib import assert_outputs_match, highest, manifest, run_signatures, versions

pytestmark = pytest.mark.timeout(600)

#: Each poisoned file and the code it must be refused with.
POISONED = {
    "huge_input.pb": "probe_too_large",
    "big_input.pb": "probe_too_large",
    "recursion.pb": "recursive_function",
    "recursion_stateful.pb": "recursive_function",
    "recursion_by_name.pb": "recursive_function",
    "deep_calls.pb": "recursive_function",
    "while_v1.pb": "probe_timeout",
    "while_v2.pb": "probe_timeout",
    "splat.pb": "tensor_too_large",
    "fill.pb": "tensor_too_large",
    "fill_dynamic.pb": "resource_exhausted",
}
#: The ones that end the worker: Abort (SIGABRT), a read of a pipe no one writes (a kernel
#: that ignores the run's deadline, ended by the daemon).
WORKER_ENDING = {"abort.pb": "probe_crashed", "fifo.pb": "probe_timeout"}
#: Small enough for the poisons to fail fast, large enough for the good models. oneDNN's CPU
#: allocator (TF_ENABLE_ONEDNN_OPTS=1) retries a refused allocation for about 10 s, in a
#: kernel the run's deadline does not stop, so the one poison that allocates past the memory
#: window at run time gets the time to be refused for that.
CHECK_LIMITS = (
    "\n[check]\nseconds = 1\nmemory_bytes = 536870912\n"
    '[[models]]\nsignature = "fill_dynamic"\nfrozen = "fill_dynamic.pb"\n'
    'inputs = { n = "n:0" }\noutputs = { y = "y:0" }\nlimits = { seconds = 30 }\n'
)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("poisoned")
    pg = poisongraphs
    fifo = root / "never-written"
    os.mkfifo(fifo)
    return {
        "huge_input.pb": pg.huge_placeholder(root / "huge_input.pb"),
        "big_input.pb": pg.big_placeholder(root / "big_input.pb"),
        "recursion.pb": pg.recursion(root / "recursion.pb"),
        "recursion_stateful.pb": pg.recursion(root / "rs.pb", "StatefulPartitionedCall"),
        "recursion_by_name.pb": pg.recursion(root / "rd.pb", "direct"),
        # Past the 256 levels the import is allowed (it overflows its stack near 5000).
        "deep_calls.pb": pg.deep_calls(root / "deep_calls.pb", 300),
        "while_v1.pb": pg.while_true(root / "while_v1.pb", v2=False),
        "while_v2.pb": pg.while_true(root / "while_v2.pb", v2=True),
        "splat.pb": pg.splat_constant(root / "splat.pb"),
        "fill.pb": pg.fill(root / "fill.pb"),
        "fill_dynamic.pb": pg.fill_dynamic(root / "fill_dynamic.pb"),
        "abort.pb": pg.abort(root / "abort.pb").path,
        "fifo.pb": pg.fifo_reader(root / "fifo.pb", fifo).path,
    }


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FrozenModel]:
    root = tmp_path_factory.mktemp("good")
    return {
        name: graphgen.write_dense(root / f"{name}.pb", seed=60 + i, in_dim=6)
        for i, name in enumerate(("good", "good2"))
    }


def assert_serves(version: Path, served: dict[str, FrozenModel]) -> None:
    feeds = {sig: {"x": np.asarray(m.sample["x"], dtype=np.float32)} for sig, m in served.items()}
    published = run_signatures(version, feeds)
    for sig, model in served.items():
        outputs = {k: v for k, v in model.outputs.items() if k in published[sig]}
        expected = graphgen.run_frozen(model.path, {model.inputs["x"]: feeds[sig]["x"]}, outputs)
        assert_outputs_match(published[sig], expected)


def refusals(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The build's model_rejected lines by file; each file is refused once per build."""
    lines = named(events, "model_rejected")
    counts = Counter(str(e.get("file")) for e in lines)
    assert all(n == 1 for n in counts.values()), counts
    return {str(e.get("file")): dict(e) for e in lines}


@pytest.mark.slow
def test_the_daemon_publishes_the_good_model_and_refuses_each_poisoned_one_by_name(
    tmp_path: Path, poisoned: dict[str, Path], good: dict[str, FrozenModel]
) -> None:
    project = Project(tmp_path)
    project.configure(discover=True, allow_ops=["Abort", "ReadFile"])
    project.config.write_text(project.config.read_text() + CHECK_LIMITS)
    project.add(good["good"], "good.pb")
    for name, path in poisoned.items():
        project.add(graphgen.FrozenModel(path, {}, {}, {}), name)

    with DaemonProcess(project.config) as daemon:
        finished = daemon.wait_for("build_finished", timeout=300)
        first = list(daemon.events)
        assert finished["outcome"] == "published", finished
        assert finished["added"] == ["good"]
        assert sorted(versions(project.serving)) == [1]
        assert set(manifest(highest(project.serving))["signatures"]) == {"good"}
        assert_serves(highest(project.serving), {"good": good["good"]})
        refused = refusals(first)
        assert {f: e["code"] for f, e in refused.items()} == POISONED | WORKER_ENDING
        assert {r["file"] for r in finished["rejected"]} == set(POISONED) | set(WORKER_ENDING)
        replaced = {e["file"]: e for e in named(first, "worker_replaced")}
        assert set(replaced) == set(WORKER_ENDING)
        assert "SIGABRT" in replaced["abort.pb"]["reason"]
        assert replaced["abort.pb"]["step"] == replaced["fifo.pb"]["step"] == "probe"
        assert named(first, "worker_crashed") == named(first, "build_retry") == []

        # A new upload: the refused bytes are not run again, and no worker dies for them.
        mark = daemon.mark()
        project.add(good["good2"], "good2.pb")
        finished = daemon.wait_for("build_finished", since=mark, timeout=300)
        second = daemon.events[mark:]
        assert finished["outcome"] == "published", finished
        assert finished["added"] == ["good2"]
        assert_serves(highest(project.serving), {"good": good["good"], "good2": good["good2"]})
        refused = refusals(second)
        assert {f: e["code"] for f, e in refused.items()} == POISONED | WORKER_ENDING
        assert all(e.get("remembered") is True for e in refused.values()), refused
        assert named(second, "worker_replaced") == []


def test_a_model_that_needs_more_memory_is_given_more_in_its_entry(
    tmp_path: Path, good: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    # 160 MB of intermediate values, over a budget of 64 MiB; its size is known only at run.
    big = poisongraphs.big_intermediate(tmp_path / "big.pb", (40, 1000, 1000))
    project.add(big, "big.pb")
    project.add(good["good"], "good.pb")
    entries = [
        model_entry("big", "big.pb", big, sample=big.sample),
        model_entry("good", "good.pb", good["good"]),
    ]
    tight = "\n[check]\nmemory_bytes = 67108864\n"
    project.configure(entries)
    project.config.write_text(project.config.read_text() + tight)

    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FAILED
    refused = one(events, "model_rejected")
    assert (refused["file"], refused["code"]) == ("big.pb", "resource_exhausted")
    assert "OOM when allocating" in refused["reason"]
    assert one(events, "build_finished")["added"] == ["good"]

    # The same bytes under the same declaration and limits: refused again, not run again.
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FAILED
    again = one(events, "model_rejected")
    assert (again["code"], again["remembered"]) == ("resource_exhausted", True)

    entries[0]["limits"] = {"memory_bytes": 1 << 30}
    project.configure(entries)
    project.config.write_text(project.config.read_text() + tight)
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.OK, named(events, "model_rejected")
    assert one(events, "build_finished")["added"] == ["big"]
    published = run_signatures(highest(project.serving), {"big": {"x": 0.5, "n": [0, 0, 0]}})
    np.testing.assert_allclose(published["big"]["y"], 40e6 * 0.5, rtol=1e-5)


def test_limits_in_a_sidecar_are_refused(
    tmp_path: Path, good: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    project.add(good["good"], "good.pb")
    (project.frozen / "good.toml").write_text(
        '[[models]]\nsignature = "good"\ninputs = { x = "x:0" }\noutputs = { y = "probs:0" }\n'
        "limits = { memory_bytes = 1099511627776 }\n"
    )
    project.configure(discover=True)
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.FAILED
    refused = one(events, "model_rejected")
    assert refused["code"] == "bad_sidecar"
    assert "only the config file may set a model's limits" in refused["reason"]


def test_scopes_never_collide_with_each_other_or_with_tfmerge_s_own_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    spaced = graphgen.write_dense(tmp_path / "spaced.pb", seed=71, in_dim=2)
    lookalike = graphgen.write_dense(tmp_path / "lookalike.pb", seed=72, in_dim=2)
    # Large constants: the merged graph gets tfmerge's restore nodes (tfmerge_save/filename).
    big = graphgen.write_big_dense(tmp_path / "big.pb", target_bytes=3_000_000, seed=73)
    served = {
        "a b": project.add(spaced, "spaced.pb") and spaced,
        "a_b_c8687a08": project.add(lookalike, "lookalike.pb") and lookalike,
        "big": project.add(big, "big.pb") and big,
    }
    for name in ("tfmerge_save", "tfmerge_main_op"):
        served[name] = poisongraphs.named_input(project.frozen / f"{name}.pb", "filename")
    entries = [
        model_entry(sig, model.path.name, model, sample=model.sample)
        for sig, model in served.items()
        if not sig.startswith("tfmerge_")
    ]
    project.configure(entries, discover=True)

    code, events = project.cli(capsys, "build")

    assert code == exitcodes.OK, named(events, "model_rejected") + named(events, "verify_failed")
    version = highest(project.serving)
    assert set(manifest(version)["signatures"]) == set(served)
    assert manifest(version)["stats"]["variables"] > 0
    feeds = {
        sig: {k: np.asarray(v, dtype=np.float32) for k, v in m.sample.items()}
        for sig, m in served.items()
    }
    published = run_signatures(version, feeds)
    for sig, model in served.items():
        outputs = {k: v for k, v in model.outputs.items() if k in published[sig]}
        tensors = {model.inputs[k]: v for k, v in feeds[sig].items()}
        assert_outputs_match(published[sig], graphgen.run_frozen(model.path, tensors, outputs))


def test_history_files_stay_one_line_per_version(
    tmp_path: Path, good: dict[str, FrozenModel], capsys: pytest.CaptureFixture[str]
) -> None:
    project = Project(tmp_path)
    for name in ("ok.pb", "comma,name.pb", "tab\tname.pb"):
        project.add(good["good"], name)
    project.add(good["good2"], "side.pb")
    (project.frozen / "side.toml").write_text(
        '[[models]]\nsignature = "new\\nline"\ninputs = { x = "x:0" }\n'
        'outputs = { y = "probs:0" }\n'
    )
    project.configure(discover=True)

    code, events = project.cli(capsys, "build")

    assert code == exitcodes.FAILED
    refused = {e["file"]: e for e in named(events, "model_rejected")}
    assert refused["comma,name.pb"]["code"] == refused["tab\tname.pb"]["code"] == "bad_name"
    assert refused["side.toml"]["code"] == "bad_sidecar"
    assert "a comma, a tab, a newline" in refused["side.toml"]["reason"]
    assert one(events, "build_finished")["added"] == ["ok"]
    history = (project.serving / "current_version").read_text().splitlines()
    assert len(history) == 1
    assert history[0].split("\t")[:2] == ["1", "ok"]
    assert (project.serving / "exported_models").read_text() == "ok\n"

    (project.frozen / "side.toml").unlink()
    config = project.config.read_text()
    project.config.write_text(
        config + '\n[[models]]\nsignature = "a,b"\nfrozen = "ok.pb"\ninputs = { x = "x:0" }\n'
        'outputs = { y = "probs:0" }\n'
    )
    code, events = project.cli(capsys, "build")
    assert code == exitcodes.CONFIG
    problems = one(events, "config_invalid")["problems"]
    assert any(p.startswith("models[0].signature: 'a,b' holds a comma") for p in problems)


def test_inspect_refuses_a_recursive_graph_instead_of_crashing(
    poisoned: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert cli.main(["inspect", str(poisoned["recursion.pb"])]) == exitcodes.FAILED
    failed = one(parse_events(capsys.readouterr().err), "inspect_failed")
    assert failed["code"] == "recursive_function"
