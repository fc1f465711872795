"""Read an NVIDIA kernel's SASS (`nvdisasm -c` text): its instructions, its loops and the main loop's mix.

The main loop is the smallest loop (a backward branch and the code from its target to it) whose body holds
matrix instructions: HMMA (Ampere mma.sync), HGMMA (Hopper wgmma), UTC*MMA (Blackwell tcgen05). Its warp
instructions per iteration, by class, and its matrix work per iteration are what the static estimate
(estimate.py) multiplies by trip counts.

Matrix work per instruction, from the opcode's shape: HMMA.16816 is m16n8k16 for one warp (4096 FLOPs);
HGMMA.64x256x16 is m64n256k16 for a warpgroup of 4 warps, each warp issuing the same instruction;
DMMA.884 is m8n8k4 for one warp. UTC*MMA carries its shape in a descriptor register, not in the text,
so its work is None here and the caller takes it from the TTGIR's dot shapes.
"""

import dataclasses
import re
from typing import Optional

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L\w+):")
_TARGET = re.compile(r"`\((\.L\w+)\)")
_MATRIX = re.compile(r"^(HMMA|HGMMA|DMMA|IMMA|QGMMA|IGMMA|UTC\w*MMA)\b")

#: Instruction classes, first match wins. "matrix": tensor-core work; "matrix_sync": the warpgroup fences
#: around wgmma; "global"/"shared"/"local": memory by space (local = spills); "uniform": the uniform datapath
#: (one value per warp, still one issue slot); "control": branches, barriers, waits, fences.
_CLASSES = (
    ("matrix", _MATRIX),
    ("matrix_sync", re.compile(r"^WARPGROUP\.")),
    ("global", re.compile(r"^(LDG|STG|LDGSTS|LDGDEPBAR|RED|ATOMG|ATOM\b|ATOM\.|UTMA|UBLKCP|UTMACMDFLUSH|CCTL)")),
    ("shared", re.compile(r"^(LDS|STS|LDSM|STSM|ATOMS|SYNCS)")),
    ("local", re.compile(r"^(LDL|STL)")),
    ("constant", re.compile(r"^(LDC|ULDC)")),
    ("control", re.compile(r"^(BRA|BRX|JMP|CALL|RET|EXIT|BAR|DEPBAR|MEMBAR|FENCE|NOP|WARPSYNC|BSSY|BSYNC|YIELD|"
                           r"ELECT|VOTE|ACQBULK|ERRBAR|NANOSLEEP|BPT|UCGABAR|ARRIVES)")),
    ("uniform", re.compile(r"^U[A-Z]")),
    ("float", re.compile(r"^(F[A-Z]|H[A-Z]|D[A-Z]|MUFU|I2F|F2I|F2F|I2FP|F2FP|RRO)")),
    ("integer", re.compile(r"^(I[A-Z]|LOP|SHF|SHL|SHR|SEL|LEA|MOV|PRMT|POPC|FLO|BREV|BMSK|VIADD|VIMNMX|VABSDIFF|"
                           r"ISETP|PLOP3|P2R|R2P|S2R|S2UR|CS2R|R2UR|SGXT|BFE|BFI|CLZ|SHFL|REDUX|CREDUX)")),
)


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "HGMMA.64x256x16.F32.BF16"
    predicate: str  # "" or e.g. "@!P5"
    operands: str


@dataclasses.dataclass(frozen=True)
class Loop:
    """A backward branch at index `end` to index `start` of the instruction list (both inclusive)."""

    start: int
    end: int

    def __len__(self):
        return self.end - self.start + 1


def instruction_class(instruction: Instruction) -> str:
    """The class of one instruction (see _CLASSES); never-executed placeholders (`@!PT`) are "nop"."""
    if instruction.predicate == "@!PT":
        return "nop"
    for name, pattern in _CLASSES:
        if pattern.match(instruction.opcode):
            return name
    return "other"


def parse_sass(sass: str, *, kernel: Optional[str] = None):
    """(instructions, labels) of the entry function `kernel` (default: the first function): the instructions
    in address order and each label's instruction index.

    Helper functions that follow it (Blackwell's tcgen05 guard-rail traps) are left out. Branch targets stay
    label names in `operands`.
    """
    instructions, labels = [], {}
    inside = False
    for line in sass.splitlines():
        stripped = line.strip()
        if stripped.startswith(".type") and "@function" in stripped:
            name = stripped.split()[1].rstrip(",").split(",")[0]
            if inside:
                break  # the next function begins: the kernel's own code is done
            inside = kernel is None or name == kernel
            continue
        if not inside:
            continue
        label = _LABEL.match(stripped)
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        match = _LINE.match(line)
        if match:
            instructions.append(Instruction(int(match.group(1), 16), match.group(3), (match.group(2) or "").strip(),
                                            match.group(4).strip()))
    if not instructions:
        raise ValueError(f"no SASS instructions found for kernel {kernel!r}")
    return instructions, labels


def loops(instructions: list, sass_labels: dict) -> list:
    """Every backward branch as a Loop. A branch to itself (the trap `BRA` after EXIT) is not a loop."""
    found = []
    for index, instruction in enumerate(instructions):
        if not instruction.opcode.startswith(("BRA", "JMP")):
            continue
        target = _TARGET.search(instruction.operands)
        if target is None or target.group(1) not in sass_labels:
            continue
        start = sass_labels[target.group(1)]
        if start < index:
            found.append(Loop(start, index))
    return found


def matrix_shape(opcode: str):
    """(m, n, k, warps per instruction) of a matrix opcode, or None when the text does not say (UTC*MMA)."""
    group = re.match(r"^(HGMMA|QGMMA|IGMMA)\.(\d+)x(\d+)x(\d+)", opcode)
    if group:
        return int(group.group(2)), int(group.group(3)), int(group.group(4)), 4
    warp = re.match(r"^(HMMA|DMMA|IMMA)\.(\d+)", opcode)
    if warp:
        digits = warp.group(2)
        for m, n in (("16", "8"), ("8", "8")):
            if digits.startswith(m + n) and len(digits) > len(m + n):
                return int(m), int(n), int(digits[len(m + n):]), 1
        raise ValueError(f"unknown matrix instruction shape in {opcode!r}")
    return None


def matrix_flops(instructions, *, num_warps: int):
    """FLOPs the program's warps do with the matrix instructions among `instructions` (each listed once), or
    None when some instruction's shape is not in its text (UTC*MMA). A warpgroup instruction counts once per
    warpgroup; a warp instruction once per warp."""
    total = 0
    for instruction in instructions:
        if not _MATRIX.match(instruction.opcode):
            continue
        shape = matrix_shape(instruction.opcode)
        if shape is None:
            return None
        m, n, k, warps = shape
        total += 2 * m * n * k * (num_warps // warps)
    return total


@dataclasses.dataclass
class MainLoop:
    """The main loop of a kernel's SASS: instructions per iteration (per warp) and their mix."""

    instructions: int  # warp instructions per iteration, each warp
    by_class: dict  # class -> instructions per iteration
    matrix: dict  # matrix opcode -> count per iteration
    matrix_flops: Optional[int]  # per iteration, whole program (None: UTC*MMA, shape not in the text)
    outside_instructions: int  # instructions of the kernel outside this loop, each counted once
    outside_matrix_flops: Optional[int]
    other_loops: int  # loops that do not overlap this one (counted once: their trip counts are not known)
    step: Optional[int]  # what the loop adds to the counter its back branch tests (loop_step), or None
    atomic_bytes: int  # per iteration, each thread: bytes of its RED/ATOMG (F32 = 4, F32x4 = 16, .64 = 8)
    outside_atomic_bytes: int

    @property
    def non_matrix(self) -> int:
        """Instructions per iteration that are neither matrix instructions nor never-executed placeholders."""
        return self.instructions - self.by_class.get("matrix", 0) - self.by_class.get("nop", 0)


def main_loop(sass: str, *, num_warps: int, kernel: Optional[str] = None) -> Optional[MainLoop]:
    """The smallest loop whose body holds matrix instructions, or None when no loop does."""
    instructions, sass_labels = parse_sass(sass, kernel=kernel)
    candidates = [loop for loop in loops(instructions, sass_labels)
                  if any(_MATRIX.match(i.opcode) for i in instructions[loop.start:loop.end + 1])]
    if not candidates:
        return None
    loop = min(candidates, key=len)
    body = instructions[loop.start:loop.end + 1]
    outside = instructions[:loop.start] + instructions[loop.end + 1:]
    by_class = {}
    for instruction in body:
        name = instruction_class(instruction)
        by_class[name] = by_class.get(name, 0) + 1
    matrix = {}
    for instruction in body:
        if _MATRIX.match(instruction.opcode):
            matrix[instruction.opcode] = matrix.get(instruction.opcode, 0) + 1
    def atomic_bytes(chunk):
        return sum(_atomic_width(i.opcode) for i in chunk if re.match(r"^(RED|ATOMG|ATOM)\b", i.opcode)
                   and i.predicate != "@!PT")

    others = [other for other in loops(instructions, sass_labels)
              if other.end < loop.start or other.start > loop.end]
    return MainLoop(instructions=len(body), by_class=dict(sorted(by_class.items())), matrix=matrix,
                    matrix_flops=matrix_flops(body, num_warps=num_warps),
                    outside_instructions=len(outside),
                    outside_matrix_flops=matrix_flops(outside, num_warps=num_warps), other_loops=len(others),
                    step=loop_step(body), atomic_bytes=atomic_bytes(body),
                    outside_atomic_bytes=atomic_bytes(outside))


def _atomic_width(opcode: str) -> int:
    vector = re.search(r"\.(?:F32|S32|U32)x(\d)", opcode)
    if vector:
        return 4 * int(vector.group(1))
    return 8 if re.search(r"\.(64|F64|U64|S64)\b", opcode) else 4


def _operands(instruction: Instruction) -> list:
    return [operand.strip() for operand in instruction.operands.split(",")]


def _immediate(text: str) -> Optional[int]:
    match = re.fullmatch(r"(-?)0x([0-9a-f]+)", text)
    return None if match is None else int(match.group(2), 16) * (-1 if match.group(1) else 1)


def loop_step(body: list) -> Optional[int]:
    """What the loop adds to the counter its back branch tests, each iteration; None when not readable.

    Follows the branch predicate to the compare that sets it (`ISETP.GE.AND P5, PT, R177, R20, PT`), then a
    compared register to an add of an immediate whose source is carried round the loop: the register itself
    (`IADD3 R177, R177, 0x40, RZ`) or one the loop copies it back into (`VIADD R59, R13, 0x20` ...
    `IMAD.MOV.U32 R13, RZ, RZ, R59`).
    """
    branch = body[-1]
    predicate = branch.predicate.lstrip("@!")
    if not predicate:
        return None
    compare = next((i for i in reversed(body[:-1]) if re.match(r"^U?ISETP", i.opcode)
                    and _operands(i)[0] == predicate), None)
    if compare is None:
        return None
    copies = {}  # register -> the register copied into it
    for instruction in body:
        operands = _operands(instruction)
        if instruction.opcode in ("MOV", "UMOV") and len(operands) == 2:
            copies[operands[0]] = operands[1]
        elif instruction.opcode == "IMAD.MOV.U32" and len(operands) == 4 and operands[1:3] == ["RZ", "RZ"]:
            copies[operands[0]] = operands[3]
    for register in _operands(compare)[2:4]:
        for instruction in body:
            operands = _operands(instruction)
            if not re.match(r"^(U?IADD3|VIADD)$", instruction.opcode) or len(operands) < 3:
                continue
            step = _immediate(operands[2])
            if operands[0] == register and step and (operands[1] == register or copies.get(operands[1]) == register):
                return step
    return None


def _atomic_width(opcode: str) -> int:
    vector = re.search(r"\.(?:F32|S32|U32)x(\d)", opcode)
    if vector:
        return 4 * int(vector.group(1))
    return 8 if re.search(r"\.(64|F64|U64|S64)\b", opcode) else 4

