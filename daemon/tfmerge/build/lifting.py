"""Large constants in function bodies, lifted to the top level of their graph. Worker side.

A frozen TF2 graph keeps a constant created inside a ``tf.while_loop`` body or a ``tf.cond``
branch (a NumPy array closed over, ``tf.constant`` in the body) as a Const node of a function
in ``library.function[].node_def``. Only top-level constants move into ``variables/``, so these
would stay in ``saved_model.pb``: under its 2 GiB cap, and copied on every load.

``lift_function_constants`` rewrites the graph so that each such constant becomes a top-level
Const (from there on treated like any other: a fed placeholder in the check, a restored
variable in the merged model), passed down to its function as one more input at every call
site, recursively:

* Functions are grouped by the call nodes that tie their signatures together: a While's cond
  and body, an If's or a Case's branches, a call's function. Every function of a group gets
  the same extra inputs, after its own, in the same order (a function ignores the ones it
  does not use).
* In the function that held it, the Const becomes ``Identity(argument)`` under the same name,
  so that ``node:output:0`` references and ``^node`` control edges stay valid.
* A While body also returns each extra input unchanged (one more output), so that the loop
  variable is loop-invariant.
* Every call node of a group gets the extra inputs after its data inputs and its type
  attributes extended (While ``T``, ``output_shapes``, ``_output_shapes``; If, Case and
  PartitionedCall ``Tin``; a direct call, whose op is the function's name, has none). When the
  call node is itself in a function, that function's group needs the input too, and so on up
  to the top level, where the input is the lifted Const.

A constant stays where it is when a group on its way up cannot be rewritten: a function of it
is named by a gradient, referenced by an op or attribute not rewritten here (dataset
functions, ``SymbolicGradient``, a function nested in another's attributes, ...), used as a
While body and also otherwise (its extra outputs would change that caller), never called, or
called recursively.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from tfmerge.build import constants, wire

_WHILE = frozenset({"While", "StatelessWhile"})
_IF = frozenset({"If", "StatelessIf"})
_CASE = frozenset({"Case", "StatelessCase"})
_CALL = frozenset({"PartitionedCall", "StatefulPartitionedCall"})
#: Name scope of the lifted constants, and prefix of the functions' extra arguments.
LIFTED_PREFIX = "tfmerge_lifted"


@dataclass
class _Site:
    """A node that calls functions: the function it is in (None: top level), what it calls."""

    container: str | None
    node: Any
    functions: list[str]
    kind: str  # "while", "if", "case", "call" or "direct"
    roles: dict[str, str] = field(default_factory=dict)  # function -> "body", "cond", ...


@dataclass(frozen=True)
class Lifted:
    function: str
    node: str
    #: The top-level Const it became.
    top_level: str
    nbytes: int


@dataclass(frozen=True)
class Kept:
    function: str
    node: str
    nbytes: int
    reason: str


@dataclass
class Report:
    lifted: list[Lifted] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)


class _Groups:
    """Union-find over function names."""

    def __init__(self, names: list[str]) -> None:
        self.parent = {n: n for n in names}

    def find(self, name: str) -> str:
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        first, second = self.find(a), self.find(b)
        if first != second:
            self.parent[max(first, second)] = min(first, second)


def _func_refs(value: Any) -> Iterator[tuple[str, bool]]:
    """(function name, nested in another function's attributes) of an AttrValue's functions."""
    kind = value.WhichOneof("value")
    funcs = [value.func] if kind == "func" else list(value.list.func) if kind == "list" else []
    for func in funcs:
        yield func.name, False
        for inner in func.attr.values():
            for name, _ in _func_refs(inner):
                yield name, True


def _site(container: str | None, node: Any, refs: dict[str, list[str]]) -> _Site | None:
    """The call site of a node whose function attributes are refs, if this module rewrites it."""
    op, names = node.op, [name for found in refs.values() for name in found]
    if op in _WHILE and set(refs) <= {"cond", "body"}:
        roles = {refs["body"][0]: "body"} if "body" in refs else {}
        if "cond" in refs:
            if refs["cond"][0] in roles:
                return None  # one function as both: its extra output would break the cond
            roles[refs["cond"][0]] = "cond"
        return _Site(container, node, names, "while", roles)
    if op in _IF and set(refs) <= {"then_branch", "else_branch"}:
        return _Site(container, node, names, "if", dict.fromkeys(names, "branch"))
    if op in _CASE and set(refs) <= {"branches"}:
        return _Site(container, node, names, "case", dict.fromkeys(names, "branch"))
    if op in _CALL and set(refs) <= {"f"}:
        return _Site(container, node, names, "call", dict.fromkeys(names, "call"))
    return None


def _sites(graph_def: Any, functions: dict[str, Any]) -> tuple[list[_Site], set[str]]:
    """Every call node, and the functions referenced in ways this module does not rewrite."""
    sites: list[_Site] = []
    pinned: set[str] = set()

    def visit(container: str | None, node: Any) -> None:
        if node.op in functions:
            sites.append(_Site(container, node, [node.op], "direct", {node.op: "call"}))
        refs: dict[str, list[str]] = {}
        for key, value in node.attr.items():
            for name, nested in _func_refs(value):
                if name in functions:
                    refs.setdefault(key, []).append(name)
                    if nested:
                        pinned.add(name)
        if not refs:
            return
        site = _site(container, node, refs)
        if site is None:
            pinned.update(name for names in refs.values() for name in names)
        else:
            sites.append(site)

    for node in graph_def.node:
        visit(None, node)
    for name, function in functions.items():
        for node in function.node_def:
            visit(name, node)
    for gradient in graph_def.library.gradient:
        pinned.update({gradient.function_name, gradient.gradient_func} & set(functions))
    return sites, pinned


def lift_function_constants(
    graph_def: Any,
    payloads: MutableMapping[str, Any] | None = None,
    offsets: MutableMapping[str, int] | None = None,
) -> Report:
    """Rewrite graph_def in place (see the module's docstring); what moved and what stayed.

    ``payloads`` and ``offsets`` (a GraphRead's, changed in place) hold the contents that
    wire.split_payloads left out of function bodies, keyed by wire.function_key. A lifted
    constant's entry is keyed by its top-level name from then on (split_large_constants
    feeds and stores it from the file's bytes); every other one is put back into its node.
    """
    report = Report()
    payloads = payloads if payloads is not None else {}
    offsets = offsets if offsets is not None else {}
    try:
        _Lifter(graph_def, payloads, offsets, report).run()
    finally:
        restore_function_payloads(graph_def, payloads, offsets)
    return report


def restore_function_payloads(
    graph_def: Any, payloads: MutableMapping[str, Any], offsets: MutableMapping[str, int]
) -> None:
    """Put every function-body payload still set aside back into its node."""
    left = [key for key in payloads if wire.FUNCTION_KEY_SEP in key]
    if not left:
        return
    functions = {f.signature.name: f for f in graph_def.library.function}
    for key in left:
        function_name, node_name = key.split(wire.FUNCTION_KEY_SEP, 1)
        for node in functions[function_name].node_def:
            if node.name == node_name:
                node.attr["value"].tensor.tensor_content = bytes(payloads[key])
        del payloads[key]
        offsets.pop(key, None)


class _Lifter:
    def __init__(
        self,
        graph_def: Any,
        payloads: MutableMapping[str, Any],
        offsets: MutableMapping[str, int],
        report: Report,
    ) -> None:
        self.graph_def = graph_def
        self.payloads = payloads
        self.offsets = offsets
        self.report = report
        self.functions = {f.signature.name: f for f in graph_def.library.function}
        self.groups = _Groups(sorted(self.functions))
        self.members: dict[str, list[str]] = defaultdict(list)
        self.roles: dict[str, set[str]] = defaultdict(set)
        #: Each group's call sites, and the keys (lifted constants) it needs, in order.
        self.callers: dict[str, list[_Site]] = defaultdict(list)
        self.needs: dict[str, list[str]] = defaultdict(list)
        self.unusable: dict[str, str] = {}
        self.arguments: dict[tuple[str, str], str] = {}

    def run(self) -> None:
        found = [
            (name, node)
            for name, function in self.functions.items()
            for node in function.node_def
            if constants.is_large_constant(node)
        ]
        if not found:
            return
        self._group()
        taken = {node.name for node in self.graph_def.node}
        lifted: dict[str, tuple[str, Any]] = {}  # key -> (function, its Const node)
        for function_name, node in found:
            why = self._obstacle(self.groups.find(function_name), frozenset())
            nbytes = self._nbytes(function_name, node)
            if why is not None:
                self.report.kept.append(Kept(function_name, node.name, nbytes, why))
                continue
            key = f"{LIFTED_PREFIX}/{function_name}/{node.name}"
            while key in taken:
                key += "_"
            taken.add(key)
            lifted[key] = (function_name, node)
            self._need(self.groups.find(function_name), key)
        self._name_arguments()
        tensors = {key: node.attr["value"].tensor for key, (_, node) in lifted.items()}
        self._extend_signatures(tensors)
        self._extend_call_sites(tensors)
        for key, (function_name, node) in lifted.items():
            self._lift(key, function_name, node)

    def _nbytes(self, function_name: str, node: Any) -> int:
        payload = self.payloads.get(wire.function_key(function_name, node.name))
        return (
            len(payload) if payload is not None else len(node.attr["value"].tensor.tensor_content)
        )

    def _group(self) -> None:
        sites, pinned = _sites(self.graph_def, self.functions)
        for site in sites:
            for name in site.functions[1:]:
                self.groups.union(site.functions[0], name)
        for name in sorted(self.functions):
            self.members[self.groups.find(name)].append(name)
        for site in sites:
            for name in site.functions:
                self.roles[name].add(site.roles[name])
            self.callers[self.groups.find(site.functions[0])].append(site)
        for group, names in self.members.items():
            for name in names:
                if name in pinned:
                    self.unusable[group] = f"function {name} is referenced where it cannot change"
                elif "body" in self.roles[name] and self.roles[name] != {"body"}:
                    self.unusable[group] = f"function {name} is a While body and called otherwise"
            if group not in self.unusable and not self.callers[group]:
                self.unusable[group] = "its function is never called"

    def _obstacle(self, group: str, seen: frozenset[str]) -> str | None:
        """Why an input cannot reach this group from the top level; None when it can."""
        if group in self.unusable:
            return self.unusable[group]
        for site in self.callers[group]:
            if site.container is None:
                continue
            up = self.groups.find(site.container)
            if up in seen or up == group:
                return f"function {site.container} is called recursively"
            why = self._obstacle(up, seen | {group})
            if why is not None:
                return why
        return None

    def _need(self, group: str, key: str) -> None:
        if key in self.needs[group]:
            return
        self.needs[group].append(key)
        for site in self.callers[group]:
            if site.container is not None:
                self._need(self.groups.find(site.container), key)

    def _name_arguments(self) -> None:
        """One argument name per (group, key), unused by every member of the group."""
        for group, keys in self.needs.items():
            used: set[str] = set()
            for name in self.members[group]:
                function = self.functions[name]
                used |= {a.name for a in function.signature.input_arg}
                used |= {a.name for a in function.signature.output_arg}
                used |= {n.name for n in function.node_def}
            for index, key in enumerate(keys):
                argument = f"{LIFTED_PREFIX}_{index}"
                while argument in used:
                    argument += "_"
                used.add(argument)
                self.arguments[(group, key)] = argument

    def _extend_signatures(self, tensors: dict[str, Any]) -> None:
        """Every member of a group takes the group's inputs; a While body returns them too."""
        for group, keys in self.needs.items():
            for name in self.members[group]:
                function = self.functions[name]
                for key in keys:
                    argument = self.arguments[(group, key)]
                    tensor = tensors[key]
                    function.signature.input_arg.add(name=argument, type=tensor.dtype)
                    if "body" in self.roles[name]:
                        output = f"{argument}_out"
                        function.signature.output_arg.add(name=output, type=tensor.dtype)
                        function.ret[output] = argument
                    shapes = function.attr.get("_input_shapes")
                    if shapes is not None:
                        shapes.list.shape.add().CopyFrom(tensor.tensor_shape)

    def _extend_call_sites(self, tensors: dict[str, Any]) -> None:
        """One more data input per key: the lifted Const, or the caller's own argument."""
        for group, keys in self.needs.items():
            for site in self.callers[group]:
                node = site.node
                if site.container is None:
                    refs = list(keys)
                else:
                    up = self.groups.find(site.container)
                    refs = [self.arguments[(up, key)] for key in keys]
                data = [ref for ref in node.input if not ref.startswith("^")]
                controls = [ref for ref in node.input if ref.startswith("^")]
                node.input[:] = data + refs + controls
                for key in keys:
                    tensor = tensors[key]
                    if site.kind == "while":
                        node.attr["T"].list.type.append(tensor.dtype)
                        for shapes in ("output_shapes", "_output_shapes"):
                            if shapes in node.attr:
                                node.attr[shapes].list.shape.add().CopyFrom(tensor.tensor_shape)
                    elif site.kind != "direct":
                        node.attr["Tin"].list.type.append(tensor.dtype)

    def _lift(self, key: str, function_name: str, node: Any) -> None:
        """The Const as a top-level node; in its function, Identity of the argument."""
        top = self.graph_def.node.add(name=key, op="Const")
        top.attr["dtype"].CopyFrom(node.attr["dtype"])
        # With the file's bytes set aside (wire), this copies no payload.
        top.attr["value"].CopyFrom(node.attr["value"])
        old_key = wire.function_key(function_name, node.name)
        nbytes = self._nbytes(function_name, node)
        if old_key in self.payloads:
            self.payloads[key] = self.payloads.pop(old_key)
            if old_key in self.offsets:
                self.offsets[key] = self.offsets.pop(old_key)
        dtype = node.attr["dtype"].type
        controls = [ref for ref in node.input if ref.startswith("^")]
        node.ClearField("attr")
        node.op = "Identity"
        node.attr["T"].type = dtype
        node.input[:] = [self.arguments[(self.groups.find(function_name), key)], *controls]
        self.report.lifted.append(Lifted(function_name, node.name, key, nbytes))
