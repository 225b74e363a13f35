"""What a compiled XLA program does, read from its optimized HLO text and memory analysis.

    exe = jax.jit(f).lower(*abstract_args).compile()
    ops = compiled.collectives(exe.as_text())      # every all-gather / all-reduce / reduce-scatter ...
    loops = compiled.while_loops(exe.as_text())     # every while loop: trip count, carried shapes
    mem = compiled.memory(exe)                      # per-device bytes by XLA's buffer assignment

Values-only tests cannot see how a program is laid out over a mesh; these readers let tests and
benchmarks assert it: that a layer scan carries batch / (data x fsdp) rows, that no weight is
all-gathered inside the decode loop, that gradients are reduce-scattered, and how many bytes the
collectives move per step (each op's bytes times the trip counts of the loops it sits in).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import numpy as np

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_CALLEES = re.compile(r"\b(body|condition|calls|to_apply|branch_computations|true_computation|false_computation)="
                      r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _itemsize(dtype: str) -> int:
    if dtype == "pred":
        return 1
    if dtype == "bf16":
        return 2
    if dtype.startswith("f8"):
        return 1
    if dtype in ("c64", "c128"):
        return int(dtype[1:]) // 8
    return int(dtype[1:]) // 8


@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str  # HLO element type: f32, bf16, s32, pred ...
    shape: tuple[int, ...]

    @property
    def bytes(self) -> int:
        return _itemsize(self.dtype) * int(np.prod(self.shape, dtype=np.int64))


def arrays(type_text: str) -> list[Array]:
    """The arrays of an HLO type ("f32[8,64]{1,0}" or a tuple of them)."""
    return [Array(d, tuple(int(x) for x in s.split(",") if x)) for d, s in _ARRAY.findall(type_text)]


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    op: str
    result: tuple[Array, ...]
    text: str  # the whole line
    computation: str

    @property
    def bytes(self) -> int:
        return sum(a.bytes for a in self.result)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op with its result arrays per device, the size of its device groups, and how
    many times it runs per call of the program (the product of the trip counts of enclosing loops)."""

    op: str  # "all-gather", "all-reduce", "reduce-scatter", ...
    result: tuple[Array, ...]
    group_size: int
    count: int
    in_loop: bool  # inside the body of some while loop
    loops: tuple[str, ...]  # the while instructions it sits in, outermost first
    text: str
    as_all_reduce: bool = False  # a reduce-scatter printed as all-reduce + dynamic-slice (CPU)
    narrowed: bool = False  # float32 on XLA:CPU, bfloat16 in the program (and on GPU / TPU)

    @property
    def logical_bytes(self) -> int:
        """Result bytes per device in the dtype the program asked for (half of `bytes` if narrowed)."""
        return self.bytes // 2 if self.narrowed else self.bytes

    @property
    def bytes(self) -> int:
        """Result bytes per device of one execution."""
        return sum(a.bytes for a in self.result)

    @property
    def wire_bytes(self) -> int:
        """Bytes one device receives per execution in a ring implementation: (n-1)/n of the gathered
        result for an all-gather, (n-1) x the result for a reduce-scatter, 2 (n-1)/n x the buffer
        for an all-reduce; the whole buffer for a permute or all-to-all."""
        n = self.group_size
        if n <= 1:
            return 0
        if self.op == "all-gather":
            return self.bytes * (n - 1) // n
        if self.op == "reduce-scatter":
            return self.bytes * (n - 1)
        if self.op == "all-reduce":
            return 2 * self.bytes * (n - 1) // n
        return self.bytes


@dataclasses.dataclass(frozen=True)
class WhileLoop:
    name: str
    trip_count: int | None
    carry: tuple[Array, ...]
    body: str
    count: int  # how many times the loop itself is entered per call of the program


class Program:
    """The computations of an HLO module and the call graph between them."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = ""
        current = None
        for line in text.splitlines():
            if current is None:
                m = _HEADER.match(line)
                if m and "=" not in line.split("(")[0]:
                    current = m.group(2)
                    self.computations[current] = []
                    if m.group(1):
                        self.entry = current
                continue
            if line.strip() == "}":
                current = None
                continue
            m = _INSTR.match(line)
            if m:
                self.computations[current].append(Instruction(m.group(2), m.group(4), tuple(arrays(m.group(3))), line,
                                                              current))
        # multiplicity of each computation and the while loops around it
        self.count: dict[str, int] = {}
        self.loops: dict[str, tuple[str, ...]] = {}
        self._visit(self.entry, 1, ())

    def _visit(self, comp: str, count: int, loops: tuple[str, ...]) -> None:
        self.count[comp] = self.count.get(comp, 0) + count
        self.loops.setdefault(comp, loops)
        for ins in self.computations.get(comp, []):
            for kind, callee in _CALLEES.findall(ins.text):
                names = [c.strip().lstrip("%") for c in callee.strip("{}").split(",") if c.strip()]
                for name in names:
                    if name not in self.computations or kind == "to_apply":
                        continue
                    if ins.op == "while":
                        trip = _TRIP.search(ins.text)
                        n = int(trip.group(1)) if trip else 1
                        self._visit(name, count * n, loops + (ins.name,))
                    else:
                        self._visit(name, count, loops)

    def _users(self, comp: str) -> dict[str, list[Instruction]]:
        users: dict[str, list[Instruction]] = {}
        for ins in self.computations[comp]:
            operands = ins.text.split(ins.op + "(", 1)[1].split(")", 1)[0]
            for name in re.findall(r"%([\w.\-]+)", operands):
                users.setdefault(name, []).append(ins)
        return users

    def _slices(self, ins: Instruction) -> bool:
        """Whether ins takes a dynamic slice of its operand (itself, or inside its fused computation)."""
        if ins.op == "dynamic-slice":
            return True
        return ins.op == "fusion" and any(i.op == "dynamic-slice" for i in self._called(ins))

    def _called(self, ins: Instruction) -> list[Instruction]:
        called = re.search(r"calls=%?([\w.\-]+)", ins.text)
        return self.computations.get(called.group(1), []) if called else []

    def _is_cast(self, ins: Instruction) -> bool:
        """An element-wise dtype change or relayout (convert, bitcast, copy, or a fusion of only those)."""
        passive = ("parameter", "convert", "bitcast", "copy", "tuple", "get-tuple-element")
        return ins.op in passive[1:4] or (ins.op == "fusion" and all(i.op in passive for i in self._called(ins)))

    def _only_sliced(self, name: str, users: dict[str, list[Instruction]], depth: int = 0) -> bool:
        """Whether every use of `name` (through casts) takes a dynamic slice of it."""
        if not users.get(name) or depth > 4:
            return False
        return all(self._slices(u) or (self._is_cast(u) and self._only_sliced(u.name, users, depth + 1))
                   for u in users[name])

    def _narrowed(self, name: str, users: dict[str, list[Instruction]], operand: Instruction | None) -> bool:
        """A float32 collective whose values are bfloat16 in the program: XLA:CPU has no bfloat16
        collectives and promotes them (its operand is a round trip through bf16, or every use
        converts the result to bf16). GPU and TPU move these in bfloat16."""
        if operand is not None and operand.op == "fusion" and any(
                i.op == "convert" and any(a.dtype == "bf16" for a in i.result) for i in self._called(operand)):
            return True
        uses = users.get(name, [])
        return bool(uses) and all(self._is_cast(u) and any(a.dtype == "bf16" for a in u.result) for u in uses)

    def _outputs(self, ins: Instruction, users: dict[str, list[Instruction]]) -> list[str | None]:
        """The names under which each result of `ins` is used (itself, or its get-tuple-elements)."""
        if len(ins.result) == 1:
            return [ins.name]
        outs: list[str | None] = [None] * len(ins.result)
        for u in users.get(ins.name, []):
            if u.op == "get-tuple-element":
                outs[int(re.search(r"index=(\d+)", u.text).group(1))] = u.name
        return outs

    def instructions(self):
        """Every instruction of every computation the entry reaches."""
        for comp, instrs in self.computations.items():
            if comp in self.count:
                yield from instrs

    def collectives(self) -> list[Collective]:
        out = []
        for comp in self.count:
            instrs = self.computations.get(comp, [])
            if not any(i.op.split("-start")[0] in COLLECTIVES for i in instrs):
                continue
            users, by_name = self._users(comp), {i.name: i for i in instrs}
            for ins in instrs:
                op = ins.op[:-len("-start")] if ins.op.endswith("-start") else ins.op
                if op not in COLLECTIVES:
                    continue
                result = ins.result
                if ins.op.endswith("-start") and len(result) > 1:
                    result = result[len(result) // 2:]  # async start: (operands..., results...)
                operands = re.findall(r"%([\w.\-]+)", ins.text.split(ins.op + "(", 1)[1].split(")", 1)[0])
                where = (_group_size(ins.text), self.count[comp], bool(self.loops[comp]), self.loops[comp], ins.text)
                outs = self._outputs(ins, users)
                for k, a in enumerate(result):
                    name = outs[k] if k < len(outs) else None
                    operand = by_name.get(operands[k]) if k < len(operands) else None
                    narrowed = a.dtype == "f32" and bool(name) and self._narrowed(name, users, operand)
                    # a combined all-reduce mixes gradients then sliced to this device's shard
                    # (reduce-scatters) with ones that stay whole (true all-reduces): one entry each
                    if op == "all-reduce" and name and self._only_sliced(name, users):
                        shard = Array(a.dtype, (a.bytes // _itemsize(a.dtype) // where[0],))
                        out.append(Collective("reduce-scatter", (shard,), *where, as_all_reduce=True, narrowed=narrowed))
                    else:
                        out.append(Collective(op, (a,), *where, narrowed=narrowed))
        return out

    def while_loops(self) -> list[WhileLoop]:
        out = []
        for ins in self.instructions():
            if ins.op != "while":
                continue
            trip = _TRIP.search(ins.text)
            body = re.search(r"body=%?([\w.\-]+)", ins.text).group(1)
            out.append(WhileLoop(ins.name, int(trip.group(1)) if trip else None, ins.result, body,
                                 self.count[ins.computation]))
        return out


def _group_size(text: str) -> int:
    """Devices per replica group of a collective, from any of XLA's three printed forms."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", text)
    if m:
        sizes = {k.strip("' "): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(","))}
        return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", text)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", text)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"source_target_pairs=\{([^}]*)\}", text)
    if m:
        return 2
    return 1


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of an optimized HLO module, with loop multiplicities."""
    return Program(hlo_text).collectives()


def while_loops(hlo_text: str) -> list[WhileLoop]:
    """Every while loop of an optimized HLO module with its carried arrays."""
    return Program(hlo_text).while_loops()


def collective_bytes(ops: list[Collective], wire: bool = True, logical: bool = False) -> dict[str, int]:
    """Bytes per device per call of the program, by op kind (loop trip counts applied): ring wire
    bytes or result bytes; `logical`: in the dtypes the program asked for (bf16 collectives that
    XLA:CPU promotes to f32 counted at 2 bytes)."""
    out: dict[str, int] = {}
    for c in ops:
        n = c.wire_bytes if wire else c.bytes
        out[c.op] = out.get(c.op, 0) + c.count * (n // 2 if logical and c.narrowed else n)
    return out


def memory(exe: Any) -> dict[str, int]:
    """Per-device bytes of a compiled executable by XLA's buffer assignment: arguments, outputs,
    temporaries, aliased (donated arguments reused as outputs) and peak = arguments + outputs +
    temporaries - aliased (what the program holds at once at most)."""
    m = exe.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out
