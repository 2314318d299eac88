"""Fast tests of the pure parts: config, model resolution, scope names, the serving folder."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tfmerge import config as config_module
from tfmerge import specs
from tfmerge.build import devices, scopes
from tfmerge.build.bundle import Entry
from tfmerge.build.variables import Variables, restore_groups
from tfmerge.config import ConfigError
from tfmerge.folders import publish
from tfmerge.tolerance import DEFAULT_TOLERANCES, Tolerance

_VALID_NODE_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "tfmerge.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BASE = 'frozen_dir = "../frozen"\nserving_dir = "../serving"\nstate_dir = "../state"\n'


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    loaded = config_module.load(write_config(tmp_path, BASE))
    assert loaded.frozen_dir == (tmp_path / "frozen").resolve()
    assert loaded.serving_dir == (tmp_path / "serving").resolve()
    assert loaded.keep_versions == 5
    assert loaded.watch.quiet_seconds == 2.0


def test_keys_left_out_take_the_settings_defaults(tmp_path: Path) -> None:
    path = write_config(tmp_path, BASE)
    loaded = config_module.load(path)
    folders = {"frozen_dir": loaded.frozen_dir, "serving_dir": loaded.serving_dir}
    expected = config_module.Config(path=path, state_dir=loaded.state_dir, **folders)
    assert loaded == expected


def test_tensor_names_default_to_output_zero(tmp_path: Path) -> None:
    text = (
        BASE
        + '[[models]]\nsignature = "a"\nfrozen = "a.pb"\ninputs = { x = "x" }\noutputs = { y = "y:1" }\n'
    )
    loaded = config_module.load(write_config(tmp_path, text))
    assert dict(loaded.models[0].inputs) == {"x": "x:0"}
    assert dict(loaded.models[0].outputs) == {"y": "y:1"}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            "[watch]\nquiet_seconds = 5.0\nmax_wait_seconds = 1.0\n",
            "watch.max_wait_seconds: must be >= quiet_seconds",
        ),
        ('allow_ops = ["Read File"]\n', "allow_ops: expected an array of op names"),
        ('[log]\nlevel = "loud"\n', "log.level: expected one of"),
        (
            (
                '[[models]]\nsignature = "a"\nfrozen = "a.pb"\ninputs = { x = "x:0" }\n'
                'outputs = { y = "y:0" }\nsample = { z = [1] }\n'
            ),
            "models[0].sample.z: names no input",
        ),
        (
            (
                '[[models]]\nsignature = "a"\nfrozen = "a.pb"\ninputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
                '[[models]]\nsignature = "a"\nfrozen = "b.pb"\ninputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
            ),
            "signature 'a' is already declared by models[0]",
        ),
        ("[worker]\ntimeout_seconds = 0\n", "worker.timeout_seconds: expected a number >= 1.0"),
        ('keep_devices = "yes"\n', "keep_devices: expected true or false"),
        (
            (
                '[[models]]\nsignature = "a"\nfrozen = "a.pb"\ninputs = { x = "x:0" }\n'
                'outputs = { y = "y:0" }\nkeep_devices = 1\n'
            ),
            "models[0].keep_devices: expected true or false",
        ),
        ("[smoke]\ntolerance = 0.1\n", "smoke.tolerance: expected a table, got 0.1"),
    ],
)
def test_config_problems_name_the_key(tmp_path: Path, extra: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_module.load(write_config(tmp_path, BASE + extra))
    assert any(expected in str(p) for p in caught.value.problems), caught.value.problems


def test_smoke_tolerances_default_to_the_numeric_contract_and_can_be_set_per_dtype(
    tmp_path: Path,
) -> None:
    assert config_module.load(write_config(tmp_path, BASE)).smoke.tolerances == dict(
        DEFAULT_TOLERANCES
    )
    text = BASE + "[smoke.tolerance]\nfloat32 = { rtol = 0.01 }\nfloat64 = { rtol = 0, atol = 0 }\n"
    tolerances = config_module.load(write_config(tmp_path, text)).smoke.tolerances
    assert tolerances == {
        **DEFAULT_TOLERANCES,
        "float32": Tolerance(rtol=0.01, atol=DEFAULT_TOLERANCES["float32"].atol),
        "float64": Tolerance(rtol=0.0, atol=0.0),
    }


@pytest.mark.parametrize("shipped", ["config/tfmerge.toml", "config/etc/tfmerge.toml"])
def test_the_shipped_configs_state_the_default_tolerances(shipped: str) -> None:
    loaded = config_module.load(Path(__file__).resolve().parent.parent / shipped)
    assert loaded.smoke.tolerances == dict(DEFAULT_TOLERANCES)


def test_every_smoke_tolerance_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = BASE + (
        "[smoke.tolerance]\n"
        'float16 = { rtol = -1, atol = "x", tol = 2 }\n'
        "int32 = { rtol = 0 }\n"
        "bfloat16 = 0.1\n"
    )
    with pytest.raises(ConfigError) as caught:
        config_module.load(write_config(tmp_path, text))
    assert sorted(map(str, caught.value.problems)) == [
        "smoke.tolerance.bfloat16: expected a table, got 0.1",
        "smoke.tolerance.float16.atol: expected a number, got 'x'",
        "smoke.tolerance.float16.rtol: expected a number >= 0.0, got -1",
        "smoke.tolerance.float16.tol: unknown key (expected one of rtol, atol)",
        "smoke.tolerance.int32: unknown key (expected one of float16, bfloat16, float32, float64)",
    ]


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config_module.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config_module.load(write_config(tmp_path, "frozen_dir = \n"))


def resolved(tmp_path: Path, extra: str = "", *, discover: bool = True) -> specs.Resolution:
    text = BASE + f"discover = {'true' if discover else 'false'}\n" + extra
    return specs.resolve(config_module.load(write_config(tmp_path, text)))


def test_discovery_skips_leftovers_and_declared_files(tmp_path: Path) -> None:
    frozen = tmp_path / "frozen"
    for name in (
        "a.pb",
        "team/b.pbtxt",
        ".a.pb.x1y2",
        "c.pb.part",
        "d.tmp",
        ".hidden/e.pb",
        "notes.txt",
    ):
        (frozen / name).parent.mkdir(parents=True, exist_ok=True)
        (frozen / name).write_bytes(b"\x01")
    extra = '[[models]]\nsignature = "declared"\nfrozen = "a.pb"\ninputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
    result = resolved(tmp_path, extra)
    assert [(s.signature, s.relpath, s.discovered) for s in result.specs] == [
        ("declared", "a.pb", False),
        ("team/b", "team/b.pbtxt", True),
    ]
    assert not result.rejections


def test_keep_devices_is_global_and_a_declaration_overrides_it(tmp_path: Path) -> None:
    frozen = tmp_path / "frozen"
    frozen.mkdir(parents=True)
    for name in ("kept.pb", "cleared.pb", "found.pb"):
        (frozen / name).write_bytes(b"\x01")
    (frozen / "cleared.toml").write_text(
        '[[models]]\nsignature = "cleared"\ninputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
        "keep_devices = false\n"
    )
    declared = '[[models]]\nsignature = "kept"\nfrozen = "kept.pb"\ninputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
    by_default = {s.signature: s.keep_devices for s in resolved(tmp_path, declared).specs}
    assert by_default == {"cleared": False, "found": False, "kept": False}
    kept = {s.signature: s for s in resolved(tmp_path, "keep_devices = true\n" + declared).specs}
    assert {name: spec.keep_devices for name, spec in kept.items()} == {
        "cleared": False,
        "found": True,
        "kept": True,
    }
    # A version built with other pins is another version.
    assert specs.spec_key(kept["kept"]) != specs.spec_key(
        dataclasses.replace(kept["kept"], keep_devices=False)
    )


@pytest.mark.parametrize(
    ("message", "code", "words"),
    [
        (
            (
                "No OpKernel was registered to support Op 'CudnnRNNV3' used by {{node c}} with "
                "these attrs: [T=DT_FLOAT]\nRegistered devices: [CPU]\nRegistered kernels:\n"
                "  device='GPU'; T in [DT_FLOAT]"
            ),
            "no_kernel",
            ["CudnnRNNV3", "(CPU)", "GPU"],
        ),
        (
            (
                "Cannot assign a device for operation StringLower: {{node StringLower}} was "
                "explicitly assigned to /device:GPU:0 but available devices are [ "
                "/job:localhost/replica:0/task:0/device:CPU:0 ]."
            ),
            "device_unavailable",
            ["StringLower", "/device:GPU:0", "keep_devices"],
        ),
        ("indices[0] = 9 is not in [0, 5)", "source_failed", ["not in [0, 5)", "sample"]),
    ],
)
def test_a_failing_source_says_what_would_make_it_run(
    message: str, code: str, words: list[str]
) -> None:
    refusal = devices.source_failure(ValueError(message))
    assert refusal.code == code
    for word in words:
        assert word in refusal.reason
    if code != "source_failed":
        assert "sample" not in refusal.reason


def test_sidecar_declares_only_its_own_graph(tmp_path: Path) -> None:
    frozen = tmp_path / "frozen"
    frozen.mkdir(parents=True)
    (frozen / "m.pb").write_bytes(b"\x01")
    (frozen / "m.toml").write_text(
        '[[models]]\nsignature = "one"\ninputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
        '[[models]]\nsignature = "two"\nfrozen = "m.pb"\ninputs = { x = "x:0" }\noutputs = { z = "z:0" }\n'
    )
    (frozen / "orphan.toml").write_text('[[models]]\nsignature = "later"\n')
    result = resolved(tmp_path, discover=False)
    assert [(s.signature, s.relpath, s.origin) for s in result.specs] == [
        ("one", "m.pb", "sidecar m.toml models[0]"),
        ("two", "m.pb", "sidecar m.toml models[1]"),
    ]
    (frozen / "m.toml").write_text(
        '[[models]]\nsignature = "x"\nfrozen = "other.pb"\ninputs = { x = "x:0" }\noutputs = { y = "y:0" }\n'
    )
    result = resolved(tmp_path, discover=False)
    assert [r.code for r in result.rejections] == ["bad_sidecar"]
    assert "declares only its own graph" in result.rejections[0].reason


def test_paths_that_leave_frozen_dir_are_refused(tmp_path: Path) -> None:
    frozen = tmp_path / "frozen"
    frozen.mkdir(parents=True)
    (tmp_path / "secret.pb").write_bytes(b"\x01")
    (frozen / "link.pb").symlink_to(tmp_path / "secret.pb")
    (frozen / "loop.pb").symlink_to(frozen / "loop.pb")
    assert specs.check_path(frozen, "../secret.pb").code == "path_escapes"  # type: ignore[union-attr]
    assert specs.check_path(frozen, "link.pb").code == "path_escapes"  # type: ignore[union-attr]
    # A link is never followed, not even to find out that it loops.
    assert specs.check_path(frozen, "loop.pb").code == "not_a_file"  # type: ignore[union-attr]
    assert specs.check_path(frozen, "gone.pb").code == "missing_file"  # type: ignore[union-attr]


@given(st.sets(st.text(min_size=1, max_size=30), min_size=1, max_size=6))
def test_scopes_are_valid_distinct_and_never_tfmerge_s_own(signatures: set[str]) -> None:
    assigned = scopes.assign(signatures)
    assert set(assigned) == signatures
    assert len(set(assigned.values())) == len(signatures)
    for scope in assigned.values():
        assert _VALID_NODE_NAME.match(scope), scope
        assert scope not in scopes.RESERVED


def test_readable_signatures_keep_their_name() -> None:
    assigned = scopes.assign(["speech_1", "my model (v2)"])
    assert assigned["speech_1"] == "speech_1"
    assert assigned["my model (v2)"].startswith("my_model__v2__")


def test_a_signature_named_like_another_s_scope_gets_a_scope_of_its_own() -> None:
    alone = scopes.assign(["a b"])["a b"]
    assert alone == "a_b_c8687a08"
    together = scopes.assign(["a b", alone])
    assert together[alone] == alone
    assert together["a b"] != alone
    assert together["a b"].startswith("a_b_c8687a08")


def test_tfmerge_s_own_names_are_never_an_input_s_scope() -> None:
    assigned = scopes.assign(["tfmerge_save", "tfmerge_main_op"])
    assert assigned["tfmerge_save"] != "tfmerge_save"
    assert assigned["tfmerge_main_op"] != "tfmerge_main_op"


def test_only_integer_named_directories_are_versions(tmp_path: Path) -> None:
    for name in ("1", "0002", "10", ".staging-x", "current_version", "3a", "-4", " 12 "):
        (tmp_path / name).mkdir()
    (tmp_path / "7").write_text("a file, not a version")
    assert publish.versions(tmp_path) == {
        1: tmp_path / "1",
        2: tmp_path / "0002",
        10: tmp_path / "10",
        12: tmp_path / " 12 ",
    }
    assert publish.next_version(tmp_path) == 13
    assert publish.next_version(tmp_path, high_water=40) == 41


def test_the_server_takes_any_name_that_parses_as_an_int64_for_a_version(tmp_path: Path) -> None:
    # absl::SimpleAtoi, as TensorFlow Serving parses a child's name, file or folder alike.
    cases = {"7": 7, "0007": 7, "+7": 7, " 7\t": 7, "-7": -7, "7a": None, "0x7": None, "": None}
    cases |= {str(2**63 - 1): 2**63 - 1, str(2**63): None, "\u0667": None}
    for name, number in cases.items():
        assert publish.server_version(name) == number, name


def test_stale_staging_is_removed_and_nothing_else(tmp_path: Path) -> None:
    serving, state = tmp_path / "serving", tmp_path / "state"
    (serving / ".staging-abc" / "variables").mkdir(parents=True)
    (serving / "1").mkdir()
    (serving / "notes").mkdir()
    running = publish.Staging.create(serving, state, "running")
    try:
        assert publish.remove_stale_staging(serving, state) == [".staging-abc"]
        assert sorted(p.name for p in serving.iterdir()) == [".staging-running", "1", "notes"]
    finally:
        running.close()
    assert sorted(p.name for p in serving.iterdir()) == ["1", "notes"]


def test_prune_keeps_at_least_two(tmp_path: Path) -> None:
    for number in (1, 2, 3, 4):
        (tmp_path / str(number)).mkdir()
    assert publish.prune(tmp_path, keep=1) == [1, 2]
    assert sorted(publish.versions(tmp_path)) == [3, 4]
    assert publish.prune(tmp_path, keep=1, protect=[3]) == []


def test_publish_refuses_to_overwrite_and_history_is_newest_first(tmp_path: Path) -> None:
    staging = tmp_path / ".staging-1"
    (staging / "variables").mkdir(parents=True)
    (staging / "saved_model.pb").write_bytes(b"x")
    assert publish.publish(staging, tmp_path, 1) == tmp_path / "1"
    assert oct((tmp_path / "1").stat().st_mode & 0o777) == oct(0o755)
    other = tmp_path / ".staging-2"
    other.mkdir()
    with pytest.raises(publish.PublishError):
        publish.publish(other, tmp_path, 1)
    publish.write_history(tmp_path, publish.HistoryLine(1, ["a", "b"], "added a, b"), ["b", "a"])
    publish.write_history(tmp_path, publish.HistoryLine(2, [], 'said "hi"\nbye'), ["a"])
    assert (tmp_path / "current_version").read_text() == (
        "2\t\t\"said 'hi' bye\"\n" + '1\ta,b\t"added a, b"\n'
    )
    assert (tmp_path / "exported_models").read_text() == "a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_folders_must_not_nest_or_coincide(tmp_path: Path) -> None:
    text = 'frozen_dir = "../f"\nserving_dir = "../f/serving"\nstate_dir = "../f"\n'
    with pytest.raises(ConfigError) as caught:
        config_module.load(write_config(tmp_path, text))
    problems = [str(p) for p in caught.value.problems]
    assert any(p.startswith("state_dir: must differ from frozen_dir") for p in problems), problems
    assert any(p.startswith("serving_dir: must not be inside frozen_dir") for p in problems), (
        problems
    )


@given(st.lists(st.integers(min_value=0, max_value=1 << 30), max_size=40))
def test_restore_groups_cover_every_variable_once_and_balance_bytes(sizes: list[int]) -> None:
    variables = Variables()
    variables.entries = [Entry(f"v{i}", 1, (size,), 0, size, 0) for i, size in enumerate(sizes)]
    groups = restore_groups(variables)
    assert sorted(i for group in groups for i in group) == list(range(len(sizes)))
    assert len(groups) == min(8, len(sizes))
    assert all(groups)
    if groups:
        loads = [sum(sizes[i] for i in group) for group in groups]
        # Largest first onto the lightest group: no group exceeds another by more than one item.
        assert max(loads) - min(loads) <= max(sizes)
