"""Find a binary GraphDef's large constants in its bytes, so that they are never copied.

Parsing a GraphDef copies every constant's ``tensor_content`` into the message, and reading
the field copies it again; for a frozen graph those bytes are nearly all of the file. This
module walks the protobuf wire format of the file instead: it finds each Const node's
``value`` tensor whose ``tensor_content`` is large, and returns the GraphDef's bytes without
those payloads (to parse: small) together with where each payload lies in the file (to feed
and to store: in place). Nothing here imports TensorFlow.

Anything unusual for a serialised GraphDef (a deprecated group, a field repeated where a
parser would merge or overwrite it) raises Unusual, and the caller parses the file the plain
way: this is a shortcut, never a second interpretation of the format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# Field numbers along the path GraphDef.node -> NodeDef.attr["value"] -> AttrValue.tensor ->
# TensorProto.tensor_content, and NodeDef's name and op.
_GRAPH_NODE = 1
_NODE_NAME, _NODE_OP, _NODE_ATTR = 1, 2, 5
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_ATTR_TENSOR = 8
_TENSOR_CONTENT = 4


class Unusual(Exception):
    """The bytes are not a GraphDef this walk handles; parse them the plain way."""


@dataclass(frozen=True)
class _Field:
    number: int
    header: int  # where the field's key starts
    start: int  # where its payload starts
    stop: int  # where its payload ends


@dataclass(frozen=True)
class Payload:
    """A large constant's tensor_content, in place in the file's bytes."""

    node: str
    start: int
    stop: int


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Unusual("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, stop: int) -> list[_Field]:
    """The fields of the message in buf[start:stop]; varint and fixed fields carry no payload."""
    fields = []
    pos = start
    while pos < stop:
        header = pos
        key, pos = _varint(buf, pos, stop)
        number, kind = key >> 3, key & 7
        if kind == _LEN:
            length, pos = _varint(buf, pos, stop)
            if pos + length > stop:
                raise Unusual("a field runs past its message")
            fields.append(_Field(number, header, pos, pos + length))
            pos += length
        elif kind == _VARINT:
            _, pos = _varint(buf, pos, stop)
        elif kind in (_I64, _I32):
            pos += 8 if kind == _I64 else 4
        else:
            raise Unusual(f"wire type {kind}")
    if pos != stop:
        raise Unusual("a field runs past its message")
    return fields


def _only(fields: Sequence[_Field], number: int) -> _Field | None:
    found = [f for f in fields if f.number == number]
    if len(found) > 1:
        raise Unusual(f"field {number} repeated")
    return found[0] if found else None


def _path_to_content(buf: memoryview, node: _Field, threshold: int) -> list[_Field] | None:
    """[attr entry, AttrValue, TensorProto, tensor_content] of a large Const node, or None."""
    fields = _fields(buf, node.start, node.stop)
    op = _only(fields, _NODE_OP)
    if op is None or bytes(buf[op.start : op.stop]) != b"Const":
        return None
    values = []
    for entry in (f for f in fields if f.number == _NODE_ATTR):
        inner = _fields(buf, entry.start, entry.stop)
        key = _only(inner, _ENTRY_KEY)
        if key is not None and bytes(buf[key.start : key.stop]) == b"value":
            values.append((entry, inner))
    if not values:
        return None
    if len(values) > 1:
        raise Unusual("attr 'value' repeated")
    entry, inner = values[0]
    value = _only(inner, _ENTRY_VALUE)
    if value is None:
        return None
    tensor = _only(_fields(buf, value.start, value.stop), _ATTR_TENSOR)
    if tensor is None:
        return None
    content = _only(_fields(buf, tensor.start, tensor.stop), _TENSOR_CONTENT)
    if content is None or content.stop - content.start < threshold:
        return None
    return [entry, value, tensor, content]


def length_field_key(number: int, length: int) -> bytes:
    """The key and length that start a length-delimited field (a message, bytes, a string)."""
    return encode_varint((number << 3) | _LEN) + encode_varint(length)


def encode_varint(value: int) -> bytes:
    """A non-negative integer as a protobuf (and LevelDB) base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _without(buf: memoryview, outer: _Field, path: Sequence[_Field]) -> bytes:
    """outer's payload with the last field of path removed and every length on the way fixed."""
    child = path[0]
    if len(path) == 1:
        return bytes(buf[outer.start : child.header]) + bytes(buf[child.stop : outer.stop])
    rebuilt = _without(buf, child, path[1:])
    return b"".join(
        (
            buf[outer.start : child.header],
            length_field_key(child.number, len(rebuilt)),
            rebuilt,
            buf[child.stop : outer.stop],
        )
    )


def _name(buf: memoryview, node: _Field) -> str:
    name = _only(_fields(buf, node.start, node.stop), _NODE_NAME)
    if name is None:
        raise Unusual("a node has no name")
    try:
        return bytes(buf[name.start : name.stop]).decode()
    except UnicodeDecodeError as exc:
        raise Unusual("a node name is not UTF-8") from exc


def split_payloads(data: memoryview, threshold: int) -> tuple[bytes | memoryview, list[Payload]]:
    """The GraphDef in data without the large constants' tensor_content, and where they are.

    Only nodes of at least ``threshold`` bytes are looked into, so the walk costs a few steps
    per node. With no large constant, data itself is returned. Raises Unusual for anything it
    does not handle.
    """
    buf = data.cast("B") if data.format != "B" else data
    parts: list[bytes | memoryview] = []
    payloads = []
    done = 0
    for node in _fields(buf, 0, len(buf)):
        if node.number != _GRAPH_NODE or node.stop - node.start < threshold:
            continue
        path = _path_to_content(buf, node, threshold)
        if path is None:
            continue
        rebuilt = _without(buf, node, path)
        parts += [buf[done : node.header], length_field_key(_GRAPH_NODE, len(rebuilt)), rebuilt]
        done = node.stop
        content = path[-1]
        payloads.append(Payload(_name(buf, node), content.start, content.stop))
    if not payloads:
        return data, []
    if len({p.node for p in payloads}) != len(payloads):
        raise Unusual("two large constants share a node name")
    parts.append(buf[done:])
    return b"".join(parts), payloads
