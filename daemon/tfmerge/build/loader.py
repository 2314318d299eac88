"""TensorFlow's C++ SavedModel loader, the one TensorFlow Serving runs, through the C API.

Worker side. ``TF_LoadSessionFromSavedModel`` restores the variables and runs the main op, as
the server does; the signatures are read from ``saved_model.pb`` by a few lines of protobuf
wire format, the graph's bytes skipped, rather than asking the loader for its MetaGraphDef,
which it would serialise whole again.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfmerge.build import tfcore
from tfmerge.build.capi import Graph, Session, Status, library


@dataclass
class SavedModel:
    """A SavedModel as the C++ loader loads it: its session, graph and MetaGraphDef."""

    session: Session
    graph: Graph
    #: The MetaGraphDef's signature_def map only (its graph is not parsed in Python).
    signature_def: Mapping[str, Any]

    def close(self) -> None:
        self.session.close()
        self.graph.close()


def load_saved_model(export_dir: str, tags: Sequence[str], config: bytes) -> SavedModel:
    """``TF_LoadSessionFromSavedModel``: restore the variables and run the main op.

    The signatures are read from ``saved_model.pb`` as the loader reads them; asking the
    loader for its MetaGraphDef would have it serialise the whole graph once more.
    """
    lib = library()
    signatures = signature_defs(Path(export_dir) / "saved_model.pb", tags)
    graph = Graph()
    options = lib.TF_NewSessionOptions()
    try:
        with Status() as status:
            lib.TF_SetConfig(options, config, len(config), status.pointer)
            status.check()
            names = (ctypes.c_char_p * len(tags))(*(t.encode() for t in tags))
            pointer = lib.TF_LoadSessionFromSavedModel(
                options, None, os.fsencode(export_dir), names, len(tags), graph.pointer, None,
                status.pointer,
            )  # fmt: skip
            status.check()
    except BaseException:
        graph.close()
        raise
    finally:
        lib.TF_DeleteSessionOptions(options)
    session = Session(graph, b"", pointer=pointer)
    return SavedModel(session, graph, signatures)


def signature_defs(saved_model: Path, tags: Sequence[str]) -> Mapping[str, Any]:
    """The signature_def map of the MetaGraphDef with these tags, its graph left unparsed."""
    with (
        saved_model.open("rb") as handle,
        mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data,
    ):
        for graph_start, graph_end in _payloads(data, 0, len(data), 2):  # meta_graphs
            found = set()
            for info_start, info_end in _payloads(data, graph_start, graph_end, 1):  # meta_info_def
                found |= {data[a:b].decode() for a, b in _payloads(data, info_start, info_end, 4)}
            if set(tags) <= found:
                meta = tfcore.meta_graph_pb2.MetaGraphDef()
                # Field 5 (signature_def) entries alone: the graph_def field is skipped.
                entries = [data[a:b] for a, b, n in _spans(data, graph_start, graph_end) if n == 5]
                meta.ParseFromString(b"".join(entries))
                signatures: Mapping[str, Any] = meta.signature_def
                return signatures
    raise ValueError(f"{saved_model} holds no MetaGraphDef tagged {sorted(tags)}")


def _payloads(data: mmap.mmap, start: int, end: int, wanted: int) -> Iterator[tuple[int, int]]:
    """Where the contents of each occurrence of one length-delimited field are."""
    for field_start, _field_end, number in _spans(data, start, end):
        if number == wanted:
            _, position = _varint(data, field_start)
            length, position = _varint(data, position)
            yield position, position + length


def _spans(data: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Where each field of the message in data[start:end] starts and ends, and its number."""
    position = start
    while position < end:
        field_start = position
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, position = _varint(data, position)
        elif wire == 1:
            position += 8
        elif wire == 2:
            length, position = _varint(data, position)
            position += length
        elif wire == 5:
            position += 4
        else:
            raise ValueError(f"unexpected wire type {wire} in a SavedModel")
        yield field_start, position, number


def _varint(data: mmap.mmap, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
