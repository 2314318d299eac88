"""Large constants as variables: read from ``variables/``, restored when the model loads.

Worker side. Each large constant of a graph was set aside by the check (a placeholder in its
place) and its bytes written to the version's data files; here each placeholder becomes a
read of a resource variable, and the graph gets the ``RestoreV2`` ops the SavedModel loader
runs (through the SaverDef) to fill those variables from the bundle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tfmerge.build import bundle, tfcore

#: The bundle's path prefix under the version; TensorFlow Serving restores from it.
VARIABLES_PREFIX = "variables/variables"
#: Where the restore nodes go in the merged graph; no input may use it as its scope.
SAVER_SCOPE = "tfmerge_save"


class Variables:
    """The large constants of every graph: the bundle's index and the graph's restore nodes."""

    def __init__(self) -> None:
        self.entries: list[bundle.Entry] = []
        self.handles: list[str] = []

    @property
    def names(self) -> list[str]:
        return [entry.key for entry in self.entries]

    @property
    def dtypes(self) -> list[int]:
        return [entry.dtype for entry in self.entries]

    @property
    def bytes(self) -> int:
        return sum(entry.size for entry in self.entries)


def externalise(
    graph_def: Any, scope: str, constants: Sequence[bundle.Entry], variables: Variables
) -> None:
    """Turn each large constant's placeholder into a resource variable read."""
    if not constants:
        return
    by_name = {f"{scope}/{entry.key}": entry for entry in constants}
    taken = {node.name for node in graph_def.node}
    handles = []
    for node in graph_def.node:
        entry = by_name.get(node.name)
        if entry is None or node.op != "Placeholder":
            continue
        handle_name = f"{node.name}/tfmerge_variable"
        while handle_name in taken:
            handle_name += "_"
        taken.add(handle_name)
        variables.entries.append(dataclasses.replace(entry, key=node.name))
        variables.handles.append(handle_name)
        handle = type(node)(name=handle_name, op="VarHandleOp", device=node.device)
        handle.attr["dtype"].type = entry.dtype
        handle.attr["shape"].shape.CopyFrom(node.attr["shape"].shape)
        handle.attr["container"].s = b""
        handle.attr["shared_name"].s = node.name.encode()
        handles.append(handle)
        controls = [ref for ref in node.input if ref.startswith("^")]
        private = {key: attr for key, attr in node.attr.items() if key.startswith("_")}
        node.ClearField("attr")
        node.op = "ReadVariableOp"
        node.attr["dtype"].type = entry.dtype
        for key, attr in private.items():
            node.attr[key].CopyFrom(attr)
        node.input[:] = [handle_name, *controls]
    graph_def.node.extend(handles)


#: At most this many RestoreV2 ops share the variables: TensorFlow runs them on parallel threads,
#: and filling fresh memory is most of a restore's time.
_RESTORE_OPS = 8


def restore_groups(writer: Variables) -> list[list[int]]:
    """The variables' indices split into groups of about equal bytes, largest first."""
    count = min(_RESTORE_OPS, len(writer.entries))
    groups: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for index in sorted(range(len(writer.entries)), key=lambda i: -writer.entries[i].size):
        # Fewest tensors breaks ties, so that no restore op is left without any.
        lightest = min(range(count), key=lambda g: (loads[g], len(groups[g])))
        groups[lightest].append(index)
        loads[lightest] += writer.entries[index].size
    return [sorted(group) for group in groups]


def add_restore(head: Any, writer: Variables, saver_def: Any) -> None:
    """The nodes the SavedModel loader runs to fill the variables from ``variables/``."""

    scope = SAVER_SCOPE
    string = tfcore.dtypes.string.as_datatype_enum
    filename = head.node.add(name=f"{scope}/filename", op="Const")
    filename.attr["dtype"].type = string
    filename.attr["value"].tensor.CopyFrom(tfcore.make_tensor_proto("model"))
    restore_all = head.node.add(name=f"{scope}/restore_all", op="NoOp")
    names, dtypes = writer.names, writer.dtypes
    for number, group in enumerate(restore_groups(writer)):
        part = f"{scope}/part_{number}"
        slices = [""] * len(group)
        for name, values in (
            ("tensor_names", [names[i] for i in group]),
            ("shape_and_slices", slices),
        ):
            const = head.node.add(name=f"{part}/{name}", op="Const")
            const.attr["dtype"].type = string
            const.attr["value"].tensor.CopyFrom(
                tfcore.make_tensor_proto(values, dtype=tfcore.dtypes.string)
            )
        restore = head.node.add(name=f"{part}/RestoreV2", op="RestoreV2")
        restore.input.extend(
            [f"{scope}/filename", f"{part}/tensor_names", f"{part}/shape_and_slices"]
        )
        restore.attr["dtypes"].list.type.extend(dtypes[i] for i in group)
        for output, index in enumerate(group):
            assign = head.node.add(name=f"{scope}/assign_{index}", op="AssignVariableOp")
            assign.input.extend([writer.handles[index], f"{part}/RestoreV2:{output}"])
            assign.attr["dtype"].type = dtypes[index]
            restore_all.input.append(f"^{assign.name}")
    saver_def.filename_tensor_name = f"{scope}/filename:0"
    # The loader only restores; a save tensor is required by the SaverDef but never run.
    saver_def.save_tensor_name = f"{scope}/filename:0"
    saver_def.restore_op_name = f"{scope}/restore_all"
    saver_def.version = saver_def.V2
