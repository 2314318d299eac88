"""The op policy: which ops a model may not use, found wherever they hide."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tfmerge.oppolicy import (
    CATEGORIES,
    DENIED_OPS,
    FILES,
    PYTHON,
    OpViolation,
    describe,
    find_violations,
    unknown_allowed_ops,
)

# Ops of ordinary serving models: a policy that refused any of them would be a defect.
ORDINARY_OPS = (
    "MatMul",
    "Conv2D",
    "DepthwiseConv2dNative",
    "BiasAdd",
    "Relu",
    "Softmax",
    "FusedBatchNormV3",
    "HashTableV2",
    "LookupTableFindV2",
    "LookupTableImportV2",
    "LookupTableSizeV2",
    "While",
    "StatelessWhile",
    "If",
    "StatelessIf",
    "Case",
    "PartitionedCall",
    "StatefulPartitionedCall",
    "Placeholder",
    "PlaceholderWithDefault",
    "Const",
    "Identity",
    "IdentityN",
    "NoOp",
    "StringJoin",
    "AsString",
    "DecodeJpeg",
    "DecodePng",
    "DecodeImage",
    "EncodeJpeg",
    "ParseExample",
    "ParseExampleV2",
    "ParseSingleExample",
    "DecodeCSV",
    "ReadVariableOp",
    "VarHandleOp",
    "Assert",
    "Print",
    "ScalarSummary",
    "Snapshot",
    "XlaCallModule",
)

# Registered ops whose names look like I/O but which were reviewed and left allowed
# (docs/op-policy.md says why). A newly registered op whose name matches SUSPECT and
# none of these fails test_every_suspect_op_is_reviewed, so a TensorFlow upgrade
# cannot add a file- or network-reaching op unnoticed.
SUSPECT = re.compile(
    r"File|Read|Write|Record|Save|Restore|Load|Dump|Print|Debug|Summary|Snapshot|Cache|Sql"
    r"|LMDB|CSV|Proto|Vocab|Immutable|Matching|Checkpoint|Rpc|Remote|Collective|DataService"
    r"|Register|Distributed|Send|Recv|Host|Nccl|Py|Abort|Heartbeat|Shutdown|Graph|Mlir|Module"
    r"|CustomCall"
)
REVIEWED_NOT_DENIED: dict[str, str] = {
    r"(Audio|Histogram|Image|Scalar|Tensor|Merge)Summary(V2)?|(Experimental)?StatsAggregatorSummary"
    r"|BoostedTrees(MakeStatsSummary|ExampleDebugOutputs)": "build protos in memory",
    r"SummaryWriter|(Close|Flush)SummaryWriter|StatsAggregatorSetSummaryWriter": (
        "act on a writer only the denied Create*Writer ops can open"
    ),
    r"Reader(NumRecordsProduced|NumWorkUnitsCompleted|Reset|RestoreState|SerializeState)(V2)?"
    r"|IdentityReader(V2)?": "reader bookkeeping; the reading is ReaderRead*",
    r"RpcCheckStatus|RpcGetValue|DeleteRpcFutureResource": "wait on a denied RpcCall's future",
    r"TensorArray(Read|Write)(V2|V3)?|_?ReadVariables?Op|ReadVariableXlaSplitND|RngReadAndSkip"
    r"|DisableCopyOnRead|(Anonymous|Delete|Dummy)MemoryCache": "tensors and caches in memory",
    r"Print|DebugGradient(Ref)?Identity|DebugNumericSummaryV2": "stderr or pure computation",
    r"DecodeCSV|ShardedFilename|ShardedFilespec|Snapshot|GraphDefVersion|RequiresOlderGraphVersion"
    r"|DatasetToGraph(V2)?|IteratorGetModelProto|BarrierReadySize": "pure computation",
    r"_?Send|_?Recv|_Host(Send|Recv|Cast)|HostConst|CopyHost|_CopyFrom(Gpu|Host)To(Host|Gpu)": (
        "between devices of one process"
    ),
    r"Nccl(AllReduce|Broadcast|Reduce)|_Nccl(Broadcast|Reduce)(Send|Recv)": "GPUs of one process",
    r"CollectiveAssignGroupV2": "computes group keys, exchanges nothing",
    r"CollectivePermute": "TPU replicas of one program, like CrossReplicaSum",
    r"XlaCallModule|XlaCustomCall(V2)?": "XLA programs that reach only code linked into the server",
    r"DTensorRestoreV2": "no kernel; only a DTensor runtime rewrites it",
    r"(Load|Retrieve)(All)?TPUEmbedding\w*Parameters|(Send|Recv)TPUEmbedding\w+"
    r"|XlaRecvTPUEmbedding\w+|XlaSendTPUEmbedding\w+|\w*TPUEmbeddingHosts?|TpuHandleToProtoKey"
    r"|_?ConfigureDistributedTPU|_?ShutdownDistributedTPU|ShutdownTPUSystem|_WaitForDistributedTPU"
    r"|_InitializeHostForDistributedTPU|_DisconnectHostFromDistributedTPUSystem|WorkerHeartbeat"
    r"|_TPUCompileMlir|Xla(Send|Recv|HostCompute|SendToHost|RecvFromHost)"
    r"|_Xla(SendFromHost|RecvAtHost)(V2)?|_XlaHostComputeMlir"
    r"|_XlaCompileMlirPlaceholderProgramKey": (
        "TPU and XLA device plumbing with no kernel on a CPU or GPU host"
    ),
}


# --- the table ---------------------------------------------------------------------


def test_every_denied_op_has_a_known_category_and_a_short_reason() -> None:
    for op, denied in DENIED_OPS.items():
        assert denied.category in CATEGORIES, op
        assert denied.reason, op
        assert len(denied.reason) <= 70, op
        assert not denied.reason.endswith("."), op


def test_the_ops_the_design_names_are_denied_in_their_category() -> None:
    expected = {
        "ReadFile": "files",
        "WriteFile": "files",
        "MatchingFiles": "files",
        "ImmutableConst": "files",
        "SaveV2": "files",
        "RestoreV2": "files",
        "MergeV2Checkpoints": "files",
        "TFRecordReaderV2": "files",
        "WholeFileReaderV2": "files",
        "InitializeTableFromTextFileV2": "files",
        "TFRecordDataset": "files",
        "TextLineDataset": "files",
        "CSVDatasetV2": "files",
        "SnapshotDatasetV2": "files",
        "CacheDatasetV2": "files",
        "CreateSummaryFileWriter": "files",
        "WriteScalarSummary": "files",
        "PrintV2": "files",
        "DebugIdentityV2": "files",
        "DecodeProtoV2": "files",
        "LoadAndRemapMatrix": "files",
        "GenerateVocabRemapping": "files",
        "RpcCall": "network",
        "RpcServerStart": "network",
        "CollectiveReduceV2": "network",
        "DataServiceDatasetV4": "network",
        "RegisterDatasetV2": "network",
        "RemoteCall": "network",
        "PyFunc": "python",
        "PyFuncStateless": "python",
        "EagerPyFunc": "python",
        "Abort": "process",
        "DatasetFromGraph": "graph",
    }
    assert {op: DENIED_OPS[op].category for op in expected} == expected


@pytest.mark.parametrize("op", ORDINARY_OPS)
def test_ordinary_model_ops_are_not_denied(op: str) -> None:
    assert op not in DENIED_OPS
    assert find_violations([("node", op, None), ("inner", op, "some_function")]) == []


def test_the_table_cannot_be_changed_by_a_caller() -> None:
    with pytest.raises(TypeError):
        DENIED_OPS["MatMul"] = DENIED_OPS["ReadFile"]  # type: ignore[index]  # the write is the test


def test_reviewed_patterns_never_cover_a_denied_op() -> None:
    for pattern in REVIEWED_NOT_DENIED:
        assert not [op for op in DENIED_OPS if re.fullmatch(pattern, op)], pattern


def test_the_documentation_lists_every_denied_op() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "op-policy.md").read_text(
        encoding="utf-8"
    )
    documented = set(re.findall(r"`(\w+)`", page))
    assert sorted(set(DENIED_OPS) - documented) == []


# --- find_violations ---------------------------------------------------------------


def test_a_denied_op_in_the_top_level_graph_is_reported_with_its_reason() -> None:
    found = find_violations([("x/read", "ReadFile", None), ("x/add", "AddV2", None)])

    assert found == [
        OpViolation(
            op="ReadFile",
            node="x/read",
            function=None,
            category=FILES,
            reason=DENIED_OPS["ReadFile"].reason,
        )
    ]


def test_a_denied_op_inside_a_function_names_the_function() -> None:
    found = find_violations([("while", "While", None), ("body/read", "ReadFile", "while_body_6")])

    assert [(v.op, v.node, v.function) for v in found] == [
        ("ReadFile", "body/read", "while_body_6")
    ]


def test_allow_ops_widens_the_policy_one_op_at_a_time() -> None:
    nodes = [
        ("read", "ReadFile", None),
        ("write", "WriteFile", "cond_true_1"),
        ("echo", "EagerPyFunc", None),
    ]

    assert [v.op for v in find_violations(nodes, allow=["ReadFile"])] == [
        "EagerPyFunc",
        "WriteFile",
    ]
    assert find_violations(nodes, allow={"ReadFile", "WriteFile", "EagerPyFunc"}) == []
    # Op names are case-sensitive, as in a GraphDef.
    assert len(find_violations(nodes, allow=["readfile"])) == 3


def test_violations_are_ordered_by_op_then_top_level_graph_then_function_and_node() -> None:
    nodes = [
        ("z", "WriteFile", None),
        ("b", "ReadFile", "g_fn"),
        ("a", "ReadFile", "f_fn"),
        ("c", "ReadFile", None),
        ("a", "ReadFile", None),
        ("p", "PyFunc", "f_fn"),
    ]

    found = find_violations(nodes)

    assert [(v.op, v.function, v.node) for v in found] == [
        ("PyFunc", "f_fn", "p"),
        ("ReadFile", None, "a"),
        ("ReadFile", None, "c"),
        ("ReadFile", "f_fn", "a"),
        ("ReadFile", "g_fn", "b"),
        ("WriteFile", None, "z"),
    ]
    assert found[0].category == PYTHON


def test_a_node_listed_twice_is_reported_once() -> None:
    node = ("read", "ReadFile", "body")
    assert len(find_violations([node, node])) == 1


def test_unknown_allowed_ops_names_typos_and_ops_that_need_no_allowing() -> None:
    assert unknown_allowed_ops(["PrintV2", "ReadFIle", "MatMul", "ReadFIle"]) == [
        "MatMul",
        "ReadFIle",
    ]
    assert unknown_allowed_ops([]) == []


_OP_POOL = sorted(DENIED_OPS)[:20] + list(ORDINARY_OPS[:10])
_TRIPLES = st.tuples(
    st.sampled_from(["a", "b", "x/read", "loop/body/c"]),
    st.sampled_from(_OP_POOL),
    st.sampled_from([None, "while_body_1", "cond_true_2", "__inference_f_3"]),
)


@given(nodes=st.lists(_TRIPLES, max_size=30), allow=st.sets(st.sampled_from(_OP_POOL)))
def test_exactly_the_denied_and_not_allowed_nodes_are_reported_in_any_input_order(
    nodes: list[tuple[str, str, str | None]], allow: set[str]
) -> None:
    found = find_violations(nodes, allow)

    assert {(v.node, v.op, v.function) for v in found} == {
        node for node in nodes if node[1] in DENIED_OPS and node[1] not in allow
    }
    assert len(found) == len(set(found))
    assert find_violations(list(reversed(nodes)), frozenset(allow)) == found
    for violation in found:
        assert violation.category == DENIED_OPS[violation.op].category


# --- describe ----------------------------------------------------------------------


def _allow_hint(sentence: str) -> list[str]:
    # The hint must paste into the config file as it is.
    _, _, hint = sentence.partition("; allow ")
    _, _, toml = hint.partition(" with ")
    allow_ops = tomllib.loads(toml)["allow_ops"]
    assert isinstance(allow_ops, list)
    return allow_ops


def test_describe_one_node_names_op_reason_node_and_the_setting() -> None:
    sentence = describe(find_violations([("x/read", "ReadFile", None)]))

    assert sentence == (
        "uses ReadFile (files: reads any file on the serving host) at node 'x/read'; "
        'allow it with allow_ops = ["ReadFile"]'
    )
    assert _allow_hint(sentence) == ["ReadFile"]


def test_describe_names_the_function_and_counts_repeated_nodes() -> None:
    sentence = describe(
        find_violations(
            [
                ("body/read", "ReadFile", "while_body_6"),
                ("body/read_1", "ReadFile", "while_body_6"),
                ("leak", "WriteFile", "cond_true_1"),
            ]
        )
    )

    assert "ReadFile (files: reads any file on the serving host) at 2 nodes" in sentence
    assert "(first 'body/read' in function 'while_body_6')" in sentence
    assert "WriteFile (files: " in sentence
    assert "at node 'leak' in function 'cond_true_1'" in sentence
    assert sentence.count("ReadFile") == 2  # once in the text, once in the hint
    assert _allow_hint(sentence) == ["ReadFile", "WriteFile"]


def test_describe_many_ops_stays_short_and_names_each_op_once() -> None:
    ops = ["Abort", "PyFunc", "ReadFile", "RpcCall", "WriteFile", "PrintV2"]
    nodes = [(f"n{i}", op, None) for i, op in enumerate(ops)]
    nodes += [(f"more{i}", "ReadFile", "f") for i in range(40)]

    sentence = describe(find_violations(nodes))

    assert sentence.startswith("uses 6 denied ops: Abort (process, 1 node), ")
    assert "ReadFile (files, 41 nodes)" in sentence
    assert "more" not in sentence  # node names are left out
    assert len(sentence) < 300
    assert _allow_hint(sentence) == sorted(ops)


def test_describe_of_nothing_is_empty() -> None:
    assert describe([]) == ""


# --- against the installed TensorFlow ----------------------------------------------


def _triples(graph_def: Any) -> list[tuple[str, str, str | None]]:
    """What the worker does: every node of the graph and of every library function."""
    found: list[tuple[str, str, str | None]] = [(n.name, n.op, None) for n in graph_def.node]
    for function in graph_def.library.function:
        found += [(n.name, n.op, function.signature.name) for n in function.node_def]
    return found


@pytest.fixture(scope="module")
def registered_ops() -> frozenset[str]:
    from tensorflow.core.framework import op_def_pb2
    from tensorflow.python.client import pywrap_tf_session

    # tf.raw_ops lists only ops with Python wrappers; the C registry has them all,
    # including the ones the Python package registers from its own extensions.
    buffer = pywrap_tf_session.TF_GetAllOpList()
    try:
        op_list = op_def_pb2.OpList.FromString(pywrap_tf_session.TF_GetBuffer(buffer))
    finally:
        pywrap_tf_session.TF_DeleteBuffer(buffer)
    return frozenset(op.name for op in op_list.op)


def test_every_denied_op_is_registered_in_this_tensorflow(registered_ops: frozenset[str]) -> None:
    # Every entry names an op of this build; none is kept for other builds.
    assert sorted(set(DENIED_OPS) - registered_ops) == []


def test_ordinary_ops_are_registered_in_this_tensorflow(registered_ops: frozenset[str]) -> None:
    assert sorted(set(ORDINARY_OPS) - registered_ops) == []


def test_every_suspect_op_is_reviewed(registered_ops: frozenset[str]) -> None:
    unreviewed = sorted(
        op
        for op in registered_ops
        if SUSPECT.search(op)
        and op not in DENIED_OPS
        and not any(re.fullmatch(pattern, op) for pattern in REVIEWED_NOT_DENIED)
    )
    assert unreviewed == []


def test_every_reviewed_pattern_still_matches_a_registered_op(
    registered_ops: frozenset[str],
) -> None:
    stale = [
        pattern
        for pattern in REVIEWED_NOT_DENIED
        if not any(re.fullmatch(pattern, op) for op in registered_ops)
    ]
    assert stale == []


@pytest.fixture(scope="module")
def hostile_graph_def() -> Any:
    import tensorflow as tf

    @tf.function
    def list_files(pattern: Any) -> Any:
        return tf.io.matching_files(pattern)

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def hostile(path: Any) -> Any:
        def body(i: Any, total: Any) -> tuple[Any, Any]:
            return i + 1, total + tf.strings.length(tf.io.read_file(path))

        _, total = tf.while_loop(lambda i, total: i < 2, body, [tf.constant(0), tf.constant(0)])

        def leak() -> Any:
            tf.io.write_file(path + ".copy", tf.strings.as_string(total))
            return tf.constant(1)

        written = tf.cond(total > 0, leak, lambda: tf.constant(0))
        echoed = tf.py_function(lambda x: x, [total], tf.int32)
        return written + echoed + tf.size(list_files(path))

    return hostile.get_concrete_function().graph.as_graph_def()


def _without_suffix(function: str | None) -> str | None:
    # Library function names carry a per-process counter: while_body_6, cond_true_42.
    return None if function is None else re.sub(r"_\d+$", "", function)


def test_denied_ops_are_found_in_loop_branch_and_call_bodies(hostile_graph_def: Any) -> None:
    found = find_violations(_triples(hostile_graph_def))

    assert [(v.op, _without_suffix(v.function)) for v in found] == [
        ("EagerPyFunc", None),
        ("MatchingFiles", "__inference_list_files"),
        ("ReadFile", "while_body"),
        ("WriteFile", "cond_true"),
    ]
    sentence = describe(found)
    assert sentence.startswith("uses 4 denied ops: EagerPyFunc (python, 1 node), ")
    assert _allow_hint(sentence) == ["EagerPyFunc", "MatchingFiles", "ReadFile", "WriteFile"]
    reads = describe([v for v in found if v.op == "ReadFile"])
    assert re.search(r"at node '[^']+' in function 'while_body_\d+'", reads), reads


def test_the_top_level_graph_alone_would_miss_them(hostile_graph_def: Any) -> None:
    top_level = [(n.name, n.op, None) for n in hostile_graph_def.node]
    assert [v.op for v in find_violations(top_level)] == ["EagerPyFunc"]


def test_allowing_every_op_found_lets_the_hostile_graph_through(hostile_graph_def: Any) -> None:
    allow = ["EagerPyFunc", "MatchingFiles", "ReadFile", "WriteFile"]
    assert find_violations(_triples(hostile_graph_def), allow) == []


@pytest.fixture(scope="module")
def ordinary_graph_def() -> Any:
    """A TF1-style serving graph with a table, TF2 control flow and function calls."""
    import tensorflow as tf

    @tf.function
    def scale(x: Any) -> Any:
        return x * 2.0

    @tf.function
    def look_up(table: Any, keys: Any) -> Any:
        return table.lookup(keys)

    graph = tf.Graph()
    with graph.as_default():
        image_bytes = tf.compat.v1.placeholder(tf.string, [], name="image_bytes")
        examples = tf.compat.v1.placeholder(tf.string, [None], name="examples")
        image = tf.cast(tf.io.decode_jpeg(image_bytes, channels=3), tf.float32)
        conv = tf.nn.conv2d(image[tf.newaxis], tf.ones([3, 3, 3, 4]), strides=1, padding="SAME")
        pooled = tf.reduce_mean(conv, axis=[1, 2])
        words = tf.io.parse_example(examples, {"word": tf.io.FixedLenFeature([], tf.string)})
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(["a", "b"]), tf.constant([0, 1], tf.int64)
            ),
            default_value=-1,
        )
        ids = table.lookup(words["word"])
        ids = tf.cond(tf.size(ids) > 0, lambda: table.lookup(words["word"]), lambda: ids)
        logits = tf.matmul(pooled, tf.ones([4, 2]))
        logits = tf.cond(tf.reduce_sum(logits) > 0, lambda: logits, lambda: -logits)
        _, logits = tf.while_loop(
            lambda i, x: i < 3, lambda i, x: (i + 1, scale(x)), [tf.constant(0), logits]
        )
        _, sizes = tf.while_loop(
            lambda i, n: i < 2,
            lambda i, n: (i + 1, n + table.size()),
            [tf.constant(0), tf.constant(0, tf.int64)],
        )
        probs = tf.identity(tf.nn.softmax(logits), name="probs")
        tf.strings.join(["class_", tf.strings.as_string(tf.argmax(probs, axis=1))])
        look_up(table, words["word"])
        with tf.control_dependencies([probs, ids, sizes]):
            tf.no_op(name="done")
    return graph.as_graph_def()


def test_an_ordinary_model_passes(ordinary_graph_def: Any) -> None:
    triples = _triples(ordinary_graph_def)
    used = {op for _, op, _ in triples}

    # The graph really holds the ops this test vouches for.
    assert {
        "MatMul",
        "Conv2D",
        "Softmax",
        "HashTableV2",
        "LookupTableFindV2",
        "LookupTableImportV2",
        "While",
        "StatelessWhile",
        "If",
        "StatelessIf",
        "PartitionedCall",
        "StatefulPartitionedCall",
        "Placeholder",
        "Const",
        "Identity",
        "NoOp",
        "StringJoin",
        "DecodeJpeg",
        "ParseExampleV2",
    } <= used
    assert any(function is not None for _, _, function in triples)
    assert find_violations(triples) == []
