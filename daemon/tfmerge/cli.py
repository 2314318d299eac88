"""The ``tfmerge`` command. TensorFlow is imported only by the subcommands that need it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tfmerge import __version__, exitcodes, logs, snapshot
from tfmerge.config import Config, ConfigError
from tfmerge.config import load as load_config
from tfmerge.daemon import pipeline
from tfmerge.folders import publish
from tfmerge.folders.errors import config_folders, folder_failure
from tfmerge.folders.state import Store
from tfmerge.logs import get_logger

DEFAULT_CONFIG = Path("/etc/tfmerge/tfmerge.toml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tfmerge",
        description="Merge frozen TensorFlow graphs into one verified SavedModel and publish it.",
    )
    parser.add_argument("--version", action="version", version=f"tfmerge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "-c",
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"config file (default {DEFAULT_CONFIG})",
        )
        return sub

    with_config(
        "run", "Run the daemon: watch frozen_dir and publish a new version on every change."
    )
    with_config("build", "Merge every model once and publish the result if it is new and verified.")
    with_config("check", "Validate the config and every input; publish nothing.")
    status = with_config(
        "status", "Show the published versions, their signatures and sources, and rejected inputs."
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    rollback = with_config("rollback", "Republish an older version as a new highest version.")
    rollback.add_argument(
        "--to",
        type=int,
        metavar="N",
        help="version to restore (default: the one before the newest)",
    )
    smoke = with_config(
        "smoke", "Send every signature's probe input to the live server and compare the answers."
    )
    smoke.add_argument(
        "--via", choices=("grpc", "rest"), default="grpc", help="protocol (default grpc)"
    )
    smoke.add_argument("--target", help="HOST:PORT (gRPC) or URL (REST); default from [serving]")
    smoke.add_argument(
        "--version", type=int, metavar="N", help="version to test (default: the newest)"
    )
    inspect = commands.add_parser(
        "inspect", help="Describe a frozen graph and print a ready-to-paste [[models]] entry."
    )
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Inputs are read under read leases, whose break would otherwise end this process.
    snapshot.ignore_lease_breaks()
    args = _parser().parse_args(argv)
    if args.command == "inspect":
        logs.configure(fmt="auto", stream=sys.stderr)
        return _inspect(args.file, as_json=args.json)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        logs.configure(fmt="auto")
        get_logger().error(
            "config_invalid", path=str(exc.path), problems=[str(p) for p in exc.problems]
        )
        return exitcodes.CONFIG
    logs.configure(fmt=config.log.format, level=config.log.level)
    commands: dict[str, Callable[[], int]] = {
        "run": lambda: _run(config),
        "build": lambda: _build(config),
        "check": lambda: _check(config),
        "status": lambda: _status(config, as_json=args.json),
        "rollback": lambda: _rollback(config, args.to),
        "smoke": lambda: _smoke(config, args),
    }
    try:
        return commands[args.command]()
    except (OSError, publish.ForeignVersion) as exc:
        return _folder_problem(exc, config)


def _folder_problem(exc: OSError | publish.ForeignVersion, config: Config) -> int:
    """One named event and an exit code for a folder only a person can put right."""
    if isinstance(exc, publish.ForeignVersion):
        get_logger().error(exc.event, reason=str(exc), **exc.fields())
        return exitcodes.FAILED
    failed = folder_failure(exc, config_folders(config))
    if failed is None:
        raise exc
    get_logger().error(failed.event, **failed.fields())
    return exitcodes.FOLDER


def _run(config: Config) -> int:
    from tfmerge.daemon.service import run_daemon

    return run_daemon(config)


def _build(config: Config) -> int:
    from tfmerge.build.run import run_build

    outcome = pipeline.run_once(config, run_build, trigger="command")
    return exitcodes.OK if outcome.ok else exitcodes.FAILED


def _check(config: Config) -> int:
    from tfmerge.build.check import check_all

    rejections = check_all(config)
    return exitcodes.OK if not rejections else exitcodes.FAILED


def _inspect(path: Path, *, as_json: bool) -> int:
    from tfmerge import oppolicy
    from tfmerge.build import constants, devices, lifting, reading, signatures, staticcheck
    from tfmerge.models import ModelRejected

    log = get_logger(file=str(path))
    try:
        # The same reader as a build's, with no size limit: inspect is run on purpose.
        read = reading.read_graph(path, path.name, 1 << 62)
        graph_def = read.graph_def
        # Before anything walks or imports the library: recursion would crash this command.
        staticcheck.check_library(graph_def)
        lifting.restore_function_payloads(graph_def, read.payloads, read.offsets)
        pinned = devices.pinned_devices(graph_def)
        light, large = constants.split_large_constants(graph_def, read.payloads, read.offsets)
        graph = signatures.import_graph(light)
        inputs, outputs = signatures.infer_signature(graph, [c.name for c in large])
    except ModelRejected as exc:
        log.error("inspect_failed", code=exc.code, reason=exc.reason)
        return exitcodes.FAILED
    placeholders = {k: signatures.tensor_sig(graph, n).as_dict() for k, n in inputs.items()}
    candidates = {k: signatures.tensor_sig(graph, n).as_dict() for k, n in outputs.items()}
    ops = Counter(node.op for node in graph_def.node)
    violations = oppolicy.find_violations(oppolicy.op_triples(graph_def))
    report: dict[str, Any] = {
        "file": str(path),
        "size": len(read.data),
        "sha256": read.sha256,
        "nodes": len(graph_def.node),
        "functions": len(graph_def.library.function),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "placeholders": placeholders,
        "candidate_outputs": candidates,
        "initializers": signatures.initializer_nodes(graph_def),
        # Device -> how many nodes (function bodies included) name it; cleared when merged.
        "devices": pinned,
        "refused_ops": oppolicy.describe(violations) or None,
        "entry": _entry_toml(path, inputs, outputs),
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return exitcodes.OK
    print(f"{path}  {report['size']:,} bytes  sha256 {read.sha256[:16]}…")
    print(f"{report['nodes']} nodes, {report['functions']} functions")
    print("ops: " + ", ".join(f"{op} {n}" for op, n in report["ops"].items()))
    print("placeholders:")
    for key, info in placeholders.items():
        print(f"  {info['name']:<40} {info['dtype']:<10} {_shape(info['shape'])}   (key {key})")
    print("candidate outputs (ops nothing consumes):")
    for key, info in candidates.items():
        print(f"  {info['name']:<40} {info['dtype']:<10} {_shape(info['shape'])}   (key {key})")
    if report["initializers"]:
        print(
            "table initializers (run when the merged model loads): "
            + ", ".join(report["initializers"])
        )
    if pinned:
        print(
            "device pins (cleared when merged; keep_devices = true keeps them): "
            + ", ".join(f"{device} on {count} nodes" for device, count in pinned.items())
        )
    if report["refused_ops"]:
        print(f"refused by the default op policy: {report['refused_ops']}")
    print("\n# ready to paste into the config (or into a sidecar " + f"{path.stem}.toml):")
    print(report["entry"], end="")
    return exitcodes.OK


def _shape(shape: Any) -> str:
    if shape is None:
        return "<unknown rank>"
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def _entry_toml(path: Path, inputs: dict[str, str], outputs: dict[str, str]) -> str:
    def table(mapping: dict[str, str]) -> str:
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {json.dumps(v)}" for k, v in mapping.items()) + " }"
        )

    return (
        "[[models]]\n"
        f"signature = {json.dumps(path.stem)}\n"
        f"frozen = {json.dumps(path.name)}\n"
        f"inputs = {table(inputs)}\n"
        f"outputs = {table(outputs)}\n"
    )


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def status_report(config: Config) -> dict[str, Any]:
    store = Store(config.state_dir)
    versions = []
    for number, path in publish.versions(config.serving_dir).items():
        manifest = publish.read_manifest(path)
        versions.append(
            {
                "version": number,
                "created": manifest.get("created"),
                "signatures": sorted(manifest.get("signatures", {})),
                "sources": manifest.get("sources", []),
                "rolled_back_from": manifest.get("rolled_back_from"),
            }
        )
    server: dict[str, Any] | None = None
    if config.serving.rest_url:
        from tfmerge.daemon import tfserving

        try:
            states = tfserving.model_status(config.serving)
            server = {"model": config.serving.model_name, "versions": [s.as_dict() for s in states]}
        except tfserving.ServingUnreachable as exc:
            server = {"model": config.serving.model_name, "error": str(exc)}
    return {
        "server": server,
        "last_live": store.live(),
        "serving_dir": str(config.serving_dir),
        "frozen_dir": str(config.frozen_dir),
        "versions": versions,
        "serving": versions[-1]["version"] if versions else None,
        "rejected": store.rejections(),
        "last_build": store.last_build(),
        "hold": store.hold(),
    }


def _status(config: Config, *, as_json: bool) -> int:
    report = status_report(config)
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return exitcodes.OK
    print(f"serving folder: {report['serving_dir']}")
    if not report["versions"]:
        print("no version published yet")
    for entry in reversed(report["versions"]):
        marker = "*" if entry["version"] == report["serving"] else " "
        note = f" (rollback of {entry['rolled_back_from']})" if entry["rolled_back_from"] else ""
        print(f"{marker} version {entry['version']}  {entry['created'] or ''}{note}")
        for source in entry["sources"]:
            served = ", ".join(source["signatures"])
            print(f"    {source['file']}  sha256 {source['sha256'][:12]}  -> {served}")
    server = report["server"]
    if server is not None:
        print(f"TensorFlow Serving's view of model {server['model']!r}:")
        if "error" in server:
            print(f"  unreachable: {server['error']}")
        for state in server.get("versions", []):
            error = (
                f" ({state['error_code']}: {state['error_message']})"
                if state["error_code"] != "OK"
                else ""
            )
            print(f"  version {state['version']}: {state['state']}{error}")
    if report["rejected"]:
        print("rejected inputs (last build):")
        for item in report["rejected"]:
            who = item.get("file") or item.get("signature")
            print(f"  {who}: {item['code']}: {item['reason']}")
    return exitcodes.OK


def _smoke(config: Config, args: argparse.Namespace) -> int:
    from tfmerge.build.smoke import smoke

    return smoke(config, via=args.via, target=args.target, version=args.version)


def _rollback(config: Config, target: int | None) -> int:
    from tfmerge.folders import rollback

    return rollback.rollback(config, target)


def entry_point() -> None:
    """The ``tfmerge`` console command.

    A process that imported TensorFlow spends about a second tearing it down at exit, after
    all its work is done and logged; such a process ends at once instead.
    """
    code = main()
    if "tensorflow" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":
    entry_point()
