"""Compile recorded launches for a GPU architecture without a GPU and count their SASS.

Triton compiles for any target on a CPU-only machine and its wheel ships ptxas, nvdisasm and
cuobjdump. `compile_launch` builds the cubin a launch recorded by `launch.record()` would run
(same signature, constexprs and alignment specialisation as the JIT derives from the real
arguments); `analyse` reads registers and local memory from cuobjdump and classifies the
instructions of the kernel's hot loop by the pipe that issues them (docs/KERNELS.md, "Model").
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

# The integer/logic pipe (half the issue rate on sm_80/sm_90): shifts, logic, adds, compares, selects, byte permutes.
ALU = {"LOP3", "LOP", "SHF", "SHL", "SHR", "IADD3", "IADD", "VIADD", "PRMT", "LEA", "ISETP", "SEL", "IMNMX",
       "VIMNMX", "BMSK", "SGXT", "FLO", "POPC", "BREV", "IABS", "PLOP3", "P2R", "R2P", "FSEL", "FSETP",
       "FMNMX", "HSETP2", "I2IP", "IMNMX"}
# The FMA pipe; IMAD/IDP/IMUL issue only on its heavy half (half rate).
FMA_HEAVY = {"IMAD", "IMUL", "IDP", "IMADSP"}
FMA = {"FFMA", "FADD", "FMUL", "HFMA2", "HADD2", "HMUL2", "FSWZADD", "FCHK"} | FMA_HEAVY
MEM = {"LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LD", "ST", "LDL", "STL", "ATOM", "ATOMG", "ATOMS", "RED",
       "REDG", "LDGSTS", "SHFL", "LDC", "ULDC", "UTMALDG", "UBLKCP", "MATCH"}
MMA = {"HMMA", "IMMA", "HGMMA", "IGMMA", "QGMMA", "BMMA", "DMMA"}
CLASSES = ("alu", "fma", "mem", "other")


def tool(name: str) -> str:
    """Path of a CUDA binary shipped in Triton's wheel (ptxas, nvdisasm, cuobjdump)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise RuntimeError(f"{name} not found in the triton wheel ({path})")
    return path


def compile_launch(rec, arch: int):
    """Compile the recorded launch `rec` (a `launch.Launch`) for sm_<arch> (e.g. 90, 80)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import create_function_from_signature

    fn = rec.kernel
    if not hasattr(fn, "params"):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1): compile in a process without it")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*rec.args, **rec.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, rec.kwargs, bound, specialization, options)
    source = GluonASTSource if fn.is_gluon() else ASTSource
    return triton.compile(source(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


@dataclass
class Instr:
    addr: int
    op: str  # opcode without modifiers, e.g. "LOP3"
    text: str
    target: int | None = None  # branch target address


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(?:\.[^\s;]*)?\s*([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def disassemble(cubin: bytes) -> list[Instr]:
    """The kernel's instructions (nvdisasm), branch targets resolved to addresses."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    instrs, labels, pending, refs = [], {}, [], []
    for line in out.splitlines():
        lab = _LABEL.match(line.strip())
        if lab:
            pending.append(lab.group(1))
            continue
        m = _LINE.search(line)
        if not m:
            continue
        ins = Instr(int(m.group(1), 16), m.group(2), m.group(0))
        for name in pending:
            labels[name] = ins.addr
        pending = []
        t = _TARGET.search(ins.text)
        if t:
            refs.append((ins, t.group(1)))
        instrs.append(ins)
    end = instrs[-1].addr + 16 if instrs else 0
    for ins, name in refs:
        ins.target = labels.get(name, end)
    return instrs


def resources(cubin: bytes) -> dict:
    """Registers, stack frame and local memory bytes per thread (spills land in the stack frame) and
    shared memory, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output: {out!r}")
    regs, stack, shared, local = map(int, m.groups())
    return dict(registers=regs, stack=stack, shared=shared, local=local)


def loops(instrs: list[Instr]) -> list[list[Instr]]:
    """The instructions of every loop (the span of a backward branch)."""
    return [[x for x in instrs if b.target <= x.addr <= b.addr]
            for b in instrs if b.op == "BRA" and b.target is not None and b.target < b.addr]


def hot_loop(instrs: list[Instr]) -> list[Instr]:
    """The instructions of the largest loop; the whole kernel if it has none."""
    found = loops(instrs)
    if found:
        return max(found, key=len)
    return [x for x in instrs if x.op not in ("EXIT", "NOP") and not (x.op == "BRA" and x.target == x.addr)]


def counts(instrs: list[Instr]) -> dict:
    """Instructions by pipe class, with the heavy-FMA and MMA subsets and the total."""
    c = {k: 0 for k in CLASSES}
    for ins in instrs:
        c[pipe(ins.op)] += 1
    return dict(c, fma_heavy=sum(i.op in FMA_HEAVY for i in instrs), mma=sum(i.op in MMA for i in instrs),
                total=len(instrs))


def pipe(op: str) -> str:
    if op in ALU:
        return "alu"
    if op in FMA:
        return "fma"
    if op in MEM:
        return "mem"
    return "other"


def analyse(cubin: bytes) -> dict:
    """Resources and the hot loop's instruction counts of one cubin; `prologue`: the counts of the largest
    loop that ends before the hot loop starts (the one-launch GEMV's input transform), or None."""
    instrs = disassemble(cubin)
    loop = hot_loop(instrs)
    before = [lp for lp in loops(instrs) if lp[-1].addr < loop[0].addr]
    c = counts(loop)
    return dict(resources(cubin), loop=len(loop), looped=any(i.op == "BRA" for i in loop),
                **{k: v for k, v in c.items() if k != "total"},
                local_ops=sum(i.op in ("LDL", "STL") for i in instrs), total=len(instrs),
                prologue=counts(max(before, key=len)) if before else None)
