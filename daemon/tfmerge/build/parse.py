"""Parse one frozen graph's bytes as a GraphDef, refusing what is not one. Worker side.

Binary (``.pb``) and text (``.pbtxt``) GraphDefs are read; a SavedModel's ``saved_model.pb``
and truncated uploads are recognised and refused with a reason a person can act on.
"""

from __future__ import annotations

from typing import Any

from tfmerge.build import tfcore
from tfmerge.models import ModelRejected


def parse_graph_def(
    data: bytes | memoryview, relpath: str, stripped: bytes | memoryview | None = None
) -> Any:
    """Parse binary (``.pb``) or text (``.pbtxt``) GraphDef bytes, refusing what is not one.

    ``stripped`` is the same binary GraphDef without its large constants' bytes
    (wire.split_payloads): parsed instead of data when it parses cleanly.
    """
    from google.protobuf import text_format

    if not data:
        raise ModelRejected("empty_file", "the file is empty")
    if relpath.endswith(".pbtxt"):
        graph_def = tfcore.graph_pb2.GraphDef()
        try:
            text_format.Parse(bytes(data).decode("utf-8"), graph_def)
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise ModelRejected("unparseable", f"not a text GraphDef: {exc}") from exc
    else:
        graph_def = _parse_clean(stripped) if stripped is not None else None
        if graph_def is None:
            graph_def = _parse_clean(data)
        if graph_def is None:
            raise _not_a_graph_def(data)
    if not graph_def.node:
        raise ModelRejected("not_a_graphdef", "the GraphDef has no nodes")
    for node in graph_def.node:
        if not node.name or not node.op:
            raise ModelRejected("not_a_graphdef", "a node has no name or no op: not a GraphDef")
    return graph_def


def _is_saved_model(data: bytes | memoryview) -> bool:
    from google.protobuf import message

    saved = tfcore.saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(data)
    except message.DecodeError:
        return False
    return bool(saved.meta_graphs) and bool(saved.meta_graphs[0].graph_def.node)


def _not_a_graph_def(data: bytes | memoryview) -> ModelRejected:
    """Why binary bytes that do not parse cleanly as a GraphDef are refused."""
    from google.protobuf import message

    if _is_saved_model(data):
        return ModelRejected(
            "not_a_graphdef", "the file is a SavedModel's saved_model.pb, not a frozen graph"
        )
    try:
        tfcore.graph_pb2.GraphDef().ParseFromString(data)
    except message.DecodeError as error:
        return ModelRejected(
            "unparseable",
            f"cannot parse as a binary GraphDef ({error}): a truncated upload, or not a GraphDef",
        )
    return ModelRejected("not_a_graphdef", "the file is not a GraphDef")


def _parse_clean(data: bytes | memoryview) -> Any:
    """The binary GraphDef in data, or None if it does not parse without unknown fields."""
    from google.protobuf import message, unknown_fields

    graph_def = tfcore.graph_pb2.GraphDef()
    try:
        graph_def.ParseFromString(data)
    except message.DecodeError:
        return None
    return None if len(unknown_fields.UnknownFieldSet(graph_def)) else graph_def
