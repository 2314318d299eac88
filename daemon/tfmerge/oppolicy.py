"""Which TensorFlow ops a published model may not contain, and why.

A GraphDef is a program that runs on the serving host with the server's rights.
This module names the ops that let such a program reach outside its inputs and
outputs: files, the network, the Python interpreter, the process itself, or a
second program the check cannot see. A graph is refused if any node uses one of
them, in the top-level graph or in any function of its library, unless the
configuration's ``allow_ops`` names the op.

Pure data and logic, no TensorFlow and no I/O, so the supervisor and the config
check can use it as well as the worker. docs/op-policy.md explains each entry
and what is deliberately left out.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from tfmerge.models import ModelRejected

FILES: Final = "files"
NETWORK: Final = "network"
PYTHON: Final = "python"
PROCESS: Final = "process"
GRAPH: Final = "graph"

CATEGORIES: Final = (FILES, NETWORK, PYTHON, PROCESS, GRAPH)


@dataclass(frozen=True)
class DeniedOp:
    """Why an op is refused: its category and a short clause for log messages."""

    category: str
    reason: str


@dataclass(frozen=True)
class OpViolation:
    """One node that uses a denied op.

    ``function`` is the function-library function the node lives in, None for
    the top-level graph.
    """

    op: str
    node: str
    function: str | None
    category: str
    reason: str


# (category, reason, ops). Reasons complete the sentence "uses ReadFile (files: ...)".
_FAMILIES: Final[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
    (FILES, "reads any file on the serving host", ("ReadFile",)),
    (FILES, "creates or overwrites any file on the serving host", ("WriteFile",)),
    (FILES, "lists the files that match a pattern", ("MatchingFiles",)),
    (FILES, "memory-maps a file named in the graph", ("ImmutableConst",)),
    (FILES, "changes the process's file system settings", ("FileSystemSetConfiguration",)),
    (
        FILES,
        "writes checkpoint files to a path the graph chooses",
        ("Save", "SaveSlices", "SaveV2"),
    ),
    (FILES, "reads tensors from any checkpoint files", ("Restore", "RestoreSlice", "RestoreV2")),
    (FILES, "merges checkpoint files and deletes the originals", ("MergeV2Checkpoints",)),
    (FILES, "reads a matrix from a checkpoint file", ("LoadAndRemapMatrix",)),
    (FILES, "reads two vocabulary files", ("GenerateVocabRemapping",)),
    (
        FILES,
        "fills a lookup table from any text file",
        ("InitializeTableFromTextFile", "InitializeTableFromTextFileV2"),
    ),
    (
        FILES,
        "creates a reader whose only use is to read files",
        (
            "FixedLengthRecordReader",
            "FixedLengthRecordReaderV2",
            "LMDBReader",
            "TFRecordReader",
            "TFRecordReaderV2",
            "TextLineReader",
            "TextLineReaderV2",
            "WholeFileReader",
            "WholeFileReaderV2",
        ),
    ),
    (
        FILES,
        "opens and reads the files a reader is given",
        ("ReaderRead", "ReaderReadUpTo", "ReaderReadUpToV2", "ReaderReadV2"),
    ),
    (FILES, "reads records from files matching a pattern", ("RecordInput",)),
    (
        FILES,
        "reads any files it is given into a dataset",
        (
            "CSVDataset",
            "CSVDatasetV2",
            "ExperimentalCSVDataset",
            "ExperimentalLMDBDataset",
            "FixedLengthRecordDataset",
            "FixedLengthRecordDatasetV2",
            "LMDBDataset",
            "TFRecordDataset",
            "TFRecordDatasetV2",
            "TextLineDataset",
        ),
    ),
    (FILES, "opens an SQLite database file", ("ExperimentalSqlDataset", "SqlDataset")),
    (
        FILES,
        "lists the files that match a pattern",
        ("ExperimentalMatchingFilesDataset", "MatchingFilesDataset"),
    ),
    (
        FILES,
        "caches dataset elements in files under a path it is given",
        ("CacheDataset", "CacheDatasetV2"),
    ),
    (
        FILES,
        "reads or writes dataset snapshot files",
        (
            "ListSnapshotChunksDataset",
            "SnapshotChunkDataset",
            "SnapshotDataset",
            "SnapshotDatasetReader",
            "SnapshotDatasetV2",
            "SnapshotNestedDatasetReader",
        ),
    ),
    (
        FILES,
        "writes a dataset to files",
        ("DatasetToTFRecord", "ExperimentalDatasetToTFRecord", "SaveDataset", "SaveDatasetV2"),
    ),
    (FILES, "reads a saved dataset from files", ("LoadDataset",)),
    (
        FILES,
        "opens a summary file or database for writing",
        ("CreateSummaryDbWriter", "CreateSummaryFileWriter"),
    ),
    (
        FILES,
        "writes to a summary file",
        (
            "ImportEvent",
            "WriteAudioSummary",
            "WriteGraphSummary",
            "WriteHistogramSummary",
            "WriteImageSummary",
            "WriteRawProtoSummary",
            "WriteScalarSummary",
            "WriteSummary",
        ),
    ),
    (FILES, "its output_stream may append to any file", ("PrintV2",)),
    (
        FILES,
        "sends tensors to its debug_urls: file paths or gRPC addresses",
        (
            "DebugIdentity",
            "DebugIdentityV2",
            "DebugIdentityV3",
            "DebugNanCount",
            "DebugNumericSummary",
        ),
    ),
    (
        FILES,
        "writes tensors to a directory named in the graph",
        ("CalibrationStatisticsSaver", "DumpTensor"),
    ),
    (FILES, "its descriptor_source may name a file to read", ("DecodeProtoV2", "EncodeProto")),
    (FILES, "reads the vocabulary file named in the graph", ("FixedUnigramCandidateSampler",)),
    (FILES, "reads the text file named in the graph", ("Skipgram",)),
    (
        NETWORK,
        "exchanges tensors with the other members of a collective group",
        (
            "CollectiveAllToAllV2",
            "CollectiveAllToAllV3",
            "CollectiveBcastRecv",
            "CollectiveBcastRecvV2",
            "CollectiveBcastSend",
            "CollectiveBcastSendV2",
            "CollectiveGather",
            "CollectiveGatherV2",
            "CollectiveInitializeCommunicator",
            "CollectiveReduce",
            "CollectiveReduceScatterV2",
            "CollectiveReduceV2",
            "CollectiveReduceV3",
        ),
    ),
    (
        NETWORK,
        "reads a dataset from a tf.data service at an address",
        (
            "DataServiceDataset",
            "DataServiceDatasetV2",
            "DataServiceDatasetV3",
            "DataServiceDatasetV4",
        ),
    ),
    (
        NETWORK,
        "sends a dataset to a tf.data service at an address",
        ("RegisterDataset", "RegisterDatasetV2"),
    ),
    (NETWORK, "asks a tf.data service to write a dataset to a directory", ("DistributedSave",)),
    (NETWORK, "runs a function on another task's device", ("RemoteCall",)),
    (
        NETWORK,
        "serves functions over gRPC on an address",
        ("RpcServer", "RpcServerRegister", "RpcServerStart"),
    ),
    (NETWORK, "calls a gRPC server at an address", ("RpcCall", "RpcClient")),
    (
        PYTHON,
        "calls back into the Python interpreter",
        ("EagerPyFunc", "PyFunc", "PyFuncStateless"),
    ),
    (PROCESS, "ends the serving process", ("Abort",)),
    (
        GRAPH,
        "builds a dataset from a serialized GraphDef this check never sees",
        ("DatasetFromGraph",),
    ),
    (GRAPH, "carries an MLIR program this check never sees", ("MlirPassthroughOp",)),
)


def _table(families: Iterable[tuple[str, str, tuple[str, ...]]]) -> Mapping[str, DeniedOp]:
    table: dict[str, DeniedOp] = {}
    for category, reason, ops in families:
        for op in ops:
            if op in table:
                raise ValueError(f"{op} is listed twice in the op policy")
            table[op] = DeniedOp(category, reason)
    return MappingProxyType(table)


#: Every op a model may not use unless ``allow_ops`` names it.
DENIED_OPS: Final[Mapping[str, DeniedOp]] = _table(_FAMILIES)

# Beyond this many distinct ops, describe() drops the reasons and node names.
_DETAILED_OPS: Final = 2


def find_violations(
    nodes: Iterable[tuple[str, str, str | None]], allow: Collection[str] = ()
) -> list[OpViolation]:
    """Every node whose op is denied and not allowed, deduplicated, in a stable order.

    ``nodes`` holds ``(node_name, op_type, function_name_or_None)`` for every
    node of the graph and of every function in its library: a denied op inside
    a While, If or PartitionedCall body lives only in the library.
    """
    allowed = frozenset(allow)
    found: set[OpViolation] = set()
    for node, op, function in nodes:
        denied = DENIED_OPS.get(op)
        if denied is not None and op not in allowed:
            found.add(OpViolation(op, node, function, denied.category, denied.reason))
    return sorted(found, key=_order)


def _order(violation: OpViolation) -> tuple[str, bool, str, str]:
    # The top-level graph first, then functions by name.
    function = violation.function
    return (violation.op, function is not None, function or "", violation.node)


def unknown_allowed_ops(allow: Iterable[str]) -> list[str]:
    """The names in ``allow`` that are not denied ops: a typo, or an op that needs no allowing."""
    return sorted(set(allow) - DENIED_OPS.keys())


def describe(violations: Iterable[OpViolation]) -> str:
    """One sentence for a log event: what is used, where, and how to allow it.

    Names each op once. Empty when there is nothing to describe.
    """
    by_op: dict[str, list[OpViolation]] = {}
    for violation in sorted(set(violations), key=_order):
        by_op.setdefault(violation.op, []).append(violation)
    if not by_op:
        return ""
    if len(by_op) <= _DETAILED_OPS:
        uses = _join(
            f"{op} ({found[0].category}: {found[0].reason}) {_where(found)}"
            for op, found in by_op.items()
        )
    else:
        uses = f"{len(by_op)} denied ops: " + ", ".join(
            f"{op} ({found[0].category}, {_count(found)})" for op, found in by_op.items()
        )
    pronoun = "it" if len(by_op) == 1 else "them"
    # JSON string arrays are valid TOML, so the hint can be pasted into the config.
    return f"uses {uses}; allow {pronoun} with allow_ops = {json.dumps(list(by_op))}"


def _where(found: list[OpViolation]) -> str:
    first = found[0]
    place = f"'{first.node}'"
    if first.function is not None:
        place += f" in function '{first.function}'"
    if len(found) == 1:
        return f"at node {place}"
    return f"at {len(found)} nodes (first {place})"


def _count(found: list[OpViolation]) -> str:
    return "1 node" if len(found) == 1 else f"{len(found)} nodes"


def _join(parts: Iterable[str]) -> str:
    items = list(parts)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def op_triples(graph_def: Any) -> Iterator[tuple[str, str, str | None]]:
    """(node, op, function) for every node of the graph and of every function in its library."""
    for node in graph_def.node:
        yield node.name, node.op, None
    for function in graph_def.library.function:
        for node in function.node_def:
            yield node.name, node.op, function.signature.name


def check_ops(graph_def: Any, allow: Sequence[str]) -> None:
    """Refuse a GraphDef (ModelRejected) that uses an op this policy denies."""
    violations = find_violations(op_triples(graph_def), allow)
    if violations:
        raise ModelRejected("forbidden_op", describe(violations))
