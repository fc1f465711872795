"""Read a kernel's TTGIR (`CompiledKernel.asm["ttgir"]`): its loops and trip counts, its dots, its philox calls.

The TTGIR is Triton's last target-independent-looking stage: loops are still `scf.for` with their bounds,
dots still carry their tile shapes (`tt.dot`, Hopper's `ttng.warp_group_dot`, Blackwell's
`ttng.tc_gen5_mma`), and each philox call (`tl.randint4x`, 10 rounds) is still 20 `tt.mulhiui` ops (2 a
round), each on a tensor of one counter per call. So the philox calls a program makes are the elements of
those ops' tensors / 20, times the trips of the loops around them.
"""

import dataclasses
import math
import re
from typing import Optional

#: `tt.mulhiui` ops per philox call: 10 rounds x 2 multiplies (Triton's `philox_impl`).
MULHI_PER_PHILOX = 20

_DEF = re.compile(r"^\s*(%[\w#:]+)\s*=\s*([\w.]+)\s*(.*)$")
_FOR = re.compile(r"scf\.for\s+%[\w]+\s*=\s*(%[\w#]+)\s+to\s+(%[\w#]+)\s+step\s+(%[\w#]+)")
_DOT_OPS = ("tt.dot", "ttng.warp_group_dot", "ttng.tc_gen5_mma", "tt.dot_scaled")
_SHAPE = re.compile(r"(?:tensor|memdesc)<((?:\d+x)+)[a-z]")


@dataclasses.dataclass
class Region:
    """One `scf.for` of the TTGIR, with the ops found directly or indirectly inside it."""

    lower: str
    upper: str
    step: str
    parent: Optional["Region"] = None
    dot_flops: int = 0  # per iteration, from the dots' shapes (directly in this loop, not in inner loops)
    philox_calls: float = 0.0  # per iteration (directly in this loop)
    trips: Optional[int] = None
    step_value: Optional[int] = None


@dataclasses.dataclass
class TtgirScan:
    """What a kernel's TTGIR says, per program."""

    loops: list  # Region, outermost first
    dot_flops_outside: int  # dots outside any loop
    philox_calls_outside: float
    main_loop: Optional[Region]  # the innermost loop holding dots

    def dot_flops_per_program(self) -> int:
        return self.dot_flops_outside + sum(loop.dot_flops * _trips_around(loop) for loop in self.loops)

    def philox_calls_per_program(self) -> float:
        return self.philox_calls_outside + sum(loop.philox_calls * _trips_around(loop) for loop in self.loops)


def _trips_around(loop: Region) -> int:
    trips = 1
    while loop is not None:
        trips *= loop.trips
        loop = loop.parent
    return trips


def _elements(type_text: str) -> int:
    """Elements of the first tensor type in `type_text`; a scalar (`: i32`) counts 1."""
    shape = _SHAPE.search(type_text)
    if shape is None:
        return 1
    return math.prod(int(d) for d in shape.group(1).rstrip("x").split("x"))


def _dot_flops(line: str) -> int:
    """2 M N K of one dot, from its operand types `A<MxK> * B<KxN>`."""
    shapes = [[int(d) for d in m.group(1).rstrip("x").split("x")] for m in _SHAPE.finditer(line.split(" : ", 1)[-1])]
    if len(shapes) < 2:
        raise ValueError(f"cannot read the operand shapes of a dot: {line.strip()[:200]}")
    (m, k), (k2, n) = shapes[0][-2:], shapes[1][-2:]
    if k != k2:
        raise ValueError(f"dot operand shapes disagree ({m}x{k} * {k2}x{n}): {line.strip()[:200]}")
    return 2 * m * n * k


class _Evaluator:
    """Values of the i32/i64 scalars a loop bound is made of: kernel arguments, constants, simple arithmetic."""

    _OPS = {"arith.addi": lambda a, b: a + b, "arith.subi": lambda a, b: a - b, "arith.muli": lambda a, b: a * b,
            "arith.divsi": lambda a, b: int(a / b), "arith.divui": lambda a, b: a // b,
            "arith.ceildivsi": lambda a, b: -(-a // b), "arith.maxsi": max, "arith.minsi": min,
            "arith.remsi": lambda a, b: int(math.fmod(a, b))}

    def __init__(self, ttgir: str, arguments: dict):
        self.arguments = arguments
        self.definitions = {}
        for line in ttgir.splitlines():
            match = _DEF.match(line)
            if match:
                self.definitions[match.group(1)] = (match.group(2), match.group(3))

    def value(self, name: str) -> int:
        if name.lstrip("%") in self.arguments:
            return int(self.arguments[name.lstrip("%")])
        if name not in self.definitions:
            raise ValueError(f"loop bound {name} is neither a kernel argument nor defined in the TTGIR")
        op, rest = self.definitions[name]
        if op == "arith.constant":
            literal = re.match(r"(-?\d+)\s*:\s*i\d+", rest)
            if literal is None:
                raise ValueError(f"loop bound {name} is a non-integer constant: {rest[:80]}")
            return int(literal.group(1))
        if op in self._OPS:
            operands = re.findall(r"%[\w#]+", rest.split(":")[0])
            return self._OPS[op](*(self.value(operand) for operand in operands[:2]))
        if op in ("arith.extsi", "arith.extui", "arith.trunci", "arith.index_cast"):
            return self.value(re.findall(r"%[\w#]+", rest)[0])
        raise ValueError(f"loop bound {name} is computed by {op}, which this reader does not evaluate")


def scan(ttgir: str, *, arguments: dict) -> TtgirScan:
    """Loops (with trip counts from `arguments`, the kernel's scalar arguments by name), dots and philox calls.

    Philox calls: a loop's (or the top level's) tensor `tt.mulhiui` ops are taken in order of appearance, 20
    to a call, and a call counts the largest tensor among its 20 (one element per counter).
    """
    evaluator = _Evaluator(ttgir, arguments)
    loops, stack = [], []  # stack: Region for scf.for, None for any other region
    outside = {"dots": 0, "mulhi": []}
    mulhi_by_region = {}
    for line in ttgir.splitlines():
        stripped = line.strip()
        if stripped.startswith("}"):
            if stack:
                stack.pop()
            if stripped.endswith("{"):
                stack.append(None)
            continue
        current = next((region for region in reversed(stack) if region is not None), None)
        loop = _FOR.search(stripped)
        if loop and stripped.endswith("{"):
            region = Region(*loop.groups(), parent=current)
            lower, upper, step = (evaluator.value(v) for v in (region.lower, region.upper, region.step))
            region.trips = max(0, -(-(upper - lower) // step))
            region.step_value = step
            loops.append(region)
            stack.append(region)
            continue
        if stripped.endswith("{"):
            stack.append(None)
        match = _DEF.match(line)
        op = match.group(2) if match else stripped.split(" ", 1)[0]
        if op in _DOT_OPS:
            flops = _dot_flops(stripped)
            if current is None:
                outside["dots"] += flops
            else:
                current.dot_flops += flops
        elif op == "tt.mulhiui":
            elements = _elements(stripped.rsplit(" : ", 1)[-1])
            mulhi_by_region.setdefault(id(current), (current, []))[1].append(elements)
    for region, elements in mulhi_by_region.values():
        # Rounds whose counter words are constants fold into scalar ops, which the compiler hoists out of loops:
        # they belong to a tensor call elsewhere, so only 20 of them make a (scalar) call of their own.
        tensors = [count for count in elements if count > 1]
        calls = sum(max(tensors[i:i + MULHI_PER_PHILOX]) for i in range(0, len(tensors), MULHI_PER_PHILOX))
        calls += (len(elements) - len(tensors)) // MULHI_PER_PHILOX
        if region is None:
            outside["mulhi"] = calls
        else:
            region.philox_calls = calls
    with_dots = [region for region in loops if region.dot_flops]
    main = with_dots[-1] if with_dots else None
    # The innermost: a loop with dots none of whose descendants has dots.
    for region in with_dots:
        if not any(other is not region and _inside(other, region) for other in with_dots):
            main = region
            break
    return TtgirScan(loops=loops, dot_flops_outside=outside["dots"], philox_calls_outside=outside["mulhi"] or 0,
                     main_loop=main)


def _inside(inner: Region, outer: Region) -> bool:
    parent = inner.parent
    while parent is not None:
        if parent is outer:
            return True
        parent = parent.parent
    return False
