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
# GraphDef.library -> FunctionDefLibrary.function -> FunctionDef.node_def, and
# FunctionDef.signature -> OpDef.name.
_GRAPH_LIBRARY = 2
_LIBRARY_FUNCTION = 1
_FUNCTION_SIGNATURE, _FUNCTION_NODE = 1, 3
_OPDEF_NAME = 1
#: Separates a function's name from its node's in the key of a payload in a function body:
#: a character no node name has.
FUNCTION_KEY_SEP = "\x00"


def function_key(function: str, node: str) -> str:
    """The key of a large constant's payload inside a function's body."""
    return f"{function}{FUNCTION_KEY_SEP}{node}"


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


def _string(buf: memoryview, message: _Field, number: int, what: str) -> str:
    found = _only(_fields(buf, message.start, message.stop), number)
    if found is None:
        raise Unusual(f"{what} has no name")
    try:
        return bytes(buf[found.start : found.stop]).decode()
    except UnicodeDecodeError as exc:
        raise Unusual(f"the name of {what} is not UTF-8") from exc


def _name(buf: memoryview, node: _Field) -> str:
    return _string(buf, node, _NODE_NAME, "a node")


def _function_name(buf: memoryview, function: _Field) -> str:
    signature = _only(_fields(buf, function.start, function.stop), _FUNCTION_SIGNATURE)
    if signature is None:
        raise Unusual("a function has no signature")
    return _string(buf, signature, _OPDEF_NAME, "a function")


def _strip_node(
    buf: memoryview, node: _Field, threshold: int
) -> tuple[list[bytes | memoryview], _Field] | None:
    """A large Const node re-encoded without its tensor_content (key, length and payload),
    and where that content is; None for any other node."""
    path = _path_to_content(buf, node, threshold)
    if path is None:
        return None
    rebuilt = _without(buf, node, path)
    return [length_field_key(node.number, len(rebuilt)), rebuilt], path[-1]


def _strip_library(
    buf: memoryview, library: _Field, threshold: int, payloads: list[Payload]
) -> bytes | None:
    """The function library without its functions' large constants (None: it has none)."""
    parts: list[bytes | memoryview] = []
    done = library.start
    for function in _fields(buf, library.start, library.stop):
        if function.number != _LIBRARY_FUNCTION or function.stop - function.start < threshold:
            continue
        rebuilt: list[bytes | memoryview] = []
        done_in_function = function.start
        for node in _fields(buf, function.start, function.stop):
            if node.number != _FUNCTION_NODE or node.stop - node.start < threshold:
                continue
            stripped = _strip_node(buf, node, threshold)
            if stripped is None:
                continue
            encoded, content = stripped
            rebuilt += [buf[done_in_function : node.header], *encoded]
            done_in_function = node.stop
            key = function_key(_function_name(buf, function), _name(buf, node))
            payloads.append(Payload(key, content.start, content.stop))
        if done_in_function == function.start:
            continue
        rebuilt.append(buf[done_in_function : function.stop])
        body = b"".join(rebuilt)
        parts += [
            buf[done : function.header],
            length_field_key(_LIBRARY_FUNCTION, len(body)),
            body,
        ]
        done = function.stop
    if done == library.start:
        return None
    parts.append(buf[done : library.stop])
    return b"".join(parts)


def split_payloads(data: memoryview, threshold: int) -> tuple[bytes | memoryview, list[Payload]]:
    """The GraphDef in data without the large constants' tensor_content, and where they are.

    Constants of function bodies are split off too, their payloads keyed by function_key.
    Only nodes of at least ``threshold`` bytes are looked into, so the walk costs a few steps
    per node. With no large constant, data itself is returned. Raises Unusual for anything it
    does not handle.
    """
    buf = data.cast("B") if data.format != "B" else data
    parts: list[bytes | memoryview] = []
    payloads: list[Payload] = []
    done = 0
    for field in _fields(buf, 0, len(buf)):
        if field.stop - field.start < threshold:
            continue
        if field.number == _GRAPH_NODE:
            stripped = _strip_node(buf, field, threshold)
            if stripped is None:
                continue
            encoded, content = stripped
            payloads.append(Payload(_name(buf, field), content.start, content.stop))
        elif field.number == _GRAPH_LIBRARY:
            library = _strip_library(buf, field, threshold, payloads)
            if library is None:
                continue
            encoded = [length_field_key(_GRAPH_LIBRARY, len(library)), library]
        else:
            continue
        parts += [buf[done : field.header], *encoded]
        done = field.stop
    if not payloads:
        return data, []
    if len({p.node for p in payloads}) != len(payloads):
        raise Unusual("two large constants share a node name")
    parts.append(buf[done:])
    return b"".join(parts), payloads
