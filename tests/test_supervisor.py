"""The supervisor never loads TensorFlow: not by import, not in the running daemon.

The boundary is the layout: ``tfmerge.build`` is the TensorFlow side, and every other module
of the package is TensorFlow-free. Only two modules open the door to ``tfmerge.build``, and
only inside a function: the command line (the commands that run a build in their own
process) and the worker (the child process's entry point).
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import tfmerge

import graphgen
from daemonlib import DaemonProcess
from projectlib import Project

PACKAGE = Path(tfmerge.__file__).resolve().parent
TENSORFLOW_SIDE = "tfmerge.build"
#: The modules allowed to import the TensorFlow side, inside a function only.
DOORS = {"tfmerge.cli", "tfmerge.daemon.worker"}


def all_modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages([str(PACKAGE)], prefix="tfmerge.")
        if info.name != "tfmerge.__main__"
    )


def tensorflow_free_modules() -> list[str]:
    return [
        m for m in all_modules() if m != TENSORFLOW_SIDE and not m.startswith(TENSORFLOW_SIDE + ".")
    ]


def source_of(module: str) -> Path:
    relative = Path(*module.split(".")[1:])
    package = PACKAGE / relative / "__init__.py"
    return package if package.exists() else PACKAGE / relative.with_suffix(".py")


def imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "tfmerge":
            return [f"tfmerge.{alias.name}" for alias in node.names]
        return [node.module]
    return []


def test_the_layout_has_both_sides() -> None:
    modules = all_modules()
    assert "tfmerge.build.run" in modules
    assert "tfmerge.daemon.service" in modules
    # Enough modules on the free side that a broken walk cannot pass by finding none.
    assert len(tensorflow_free_modules()) >= 20


def test_tensorflow_free_modules_do_not_import_tensorflow() -> None:
    code = (
        "import json, sys\n"
        f"for name in {tensorflow_free_modules()!r}:\n"
        "    __import__(name)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'numpy'))\n"
        "print(json.dumps(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize("module", tensorflow_free_modules())
def test_only_the_doors_import_the_tensorflow_side(module: str) -> None:
    tree = ast.parse(source_of(module).read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        for name in imported_names(node):
            if name != TENSORFLOW_SIDE and not name.startswith(TENSORFLOW_SIDE + "."):
                continue
            where = f"{module} line {node.lineno} imports {name}"
            assert module in DOORS, where
            assert id(node) not in top_level, f"{where} at module level"


def test_the_check_sees_a_forbidden_import() -> None:
    """The AST walk above finds an import of the TensorFlow side where there is one."""
    tree = ast.parse("def f():\n    from tfmerge.build import run\n")
    found = [name for node in ast.walk(tree) for name in imported_names(node)]
    assert found == ["tfmerge.build"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_running_daemon_has_no_tensorflow_mapped(tmp_path: Path) -> None:
    project = Project(tmp_path)
    graphgen.write_dense(project.frozen / "m.pb")
    project.configure(discover=True)
    with DaemonProcess(project.config) as daemon:
        daemon.wait_ready()
        # A build has run: its result came back through the pipe and was unpickled here.
        assert daemon.named("build_finished")[0]["outcome"] == "published"
        maps = Path(f"/proc/{daemon.process.pid}/maps").read_text()
        assert "libtensorflow" not in maps
        assert "_pywrap_tensorflow" not in maps
