"""A structural check of a ``.tflite`` file, before any interpreter sees it.

The TFLite runtimes trust their input: a file that is still a valid flatbuffer but whose
graph points at the wrong tensor can abort the process inside ``allocate_tensors()``
(SIGABRT, no message). This module reads the flatbuffer with explicit bounds checks (no
schema code, only ``struct``) and refuses, with one line naming the file, what a runtime
should never be given:

- offsets, vectors and strings outside the file; an unknown schema version;
- operator, tensor, buffer and subgraph indices out of range (graph inputs/outputs, operator
  inputs/outputs/intermediates, signature definitions);
- a graph that does not flow: an operator reading a tensor that nothing has produced yet
  (not a graph input, a constant or a variable), writing a constant or a graph input, or a
  tensor written by two operators;
- tensor shapes with negative dimensions or absurd sizes, constant data whose length does not
  match the shape, unknown tensor types;
- quantisation parameters that are not finite, scale/zero-point vectors of different
  lengths, a per-channel dimension outside the shape, and quantised activations of
  arithmetic operators without a positive scale or with a zero point outside their type.

What a static check cannot rule out is handled by ``edge_runtime.load_guard`` (the first load in a
child process).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from .errors import ModelError

SCHEMA_VERSION = 3
MAX_ELEMENTS = 1 << 31          # per tensor
MAX_TENSORS = 1 << 20           # per subgraph
MAX_OPERATORS = 1 << 20
#: Metadata entries and signatures a model may carry. A converted file has a handful; LiteRT
#: allocates per entry at load, so a small file listing thousands would cost gigabytes there.
MAX_METADATA = 64
MAX_SIGNATURES = 64
MAX_NAME = 256                  # characters of a metadata entry's name

# TensorType -> bytes per element (None: variable size or packed, not checked against data)
_ELEMENT_SIZE = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 5: None, 6: 1, 7: 2, 8: 8, 9: 1, 10: 8, 11: 16, 12: 8,
                 13: None, 14: None, 15: 4, 16: 2, 17: None, 18: 2, 19: None, 20: None, 21: 1, 22: 1}
_INT8, _UINT8, _INT16 = 9, 3, 7
_QUANT_RANGE = {_INT8: (-128, 127), _UINT8: (0, 255), _INT16: (-32768, 32767)}
# Builtin operators whose quantised kernels divide by their tensors' scales.
_QUANTISED_ARITHMETIC = {0, 1, 2, 3, 4, 9, 14, 17, 18, 25, 40, 41, 114}
_CUSTOM = 32


@dataclass(frozen=True)
class Structure:
    """What the check saw: counts, for ``inspect``."""

    subgraphs: int
    operators: int
    tensors: int
    buffers: int


class _Bad(Exception):
    pass


_STRUCTS = {fmt: struct.Struct(fmt) for fmt in ("<b", "<B", "<H", "<i", "<I", "<q", "<Q", "<f")}


class _Reader:
    """Bounds-checked flatbuffer access (the ``flatbuffers`` package does not check bounds)."""

    def __init__(self, data: bytes):
        self.d = data
        self.n = len(data)

    def get(self, fmt: str, pos: int):
        s = _STRUCTS[fmt]
        if pos < 0 or pos + s.size > self.n:
            raise _Bad(f"read at offset {pos} is outside the file")
        return s.unpack_from(self.d, pos)[0]

    def table(self, pos: int) -> "_Table":
        return _Table(self, pos)

    def indirect(self, pos: int) -> int:
        return pos + self.get("<I", pos)


class _Table:
    def __init__(self, r: _Reader, pos: int):
        self.r = r
        self.pos = pos
        self.vt = pos - r.get("<i", pos)
        self.vt_len = r.get("<H", self.vt)
        if self.vt_len < 4 or self.vt_len % 2:
            raise _Bad(f"table at offset {pos} has a bad vtable")

    def _off(self, slot: int) -> int:
        voff = 4 + 2 * slot
        if voff + 2 > self.vt_len:
            return 0
        return self.r.get("<H", self.vt + voff)

    def scalar(self, slot: int, fmt: str, default=0):
        o = self._off(slot)
        return self.r.get(fmt, self.pos + o) if o else default

    def has(self, slot: int) -> bool:
        return bool(self._off(slot))

    def vector(self, slot: int, elem_size: int) -> Optional[Tuple[int, int]]:
        o = self._off(slot)
        if not o:
            return None
        p = self.r.indirect(self.pos + o)
        length = self.r.get("<I", p)
        start = p + 4
        if start + length * elem_size > self.r.n:
            raise _Bad(f"vector at offset {p} runs past the end of the file")
        return start, length

    def ints(self, slot: int, fmt: str = "<i") -> List[int]:
        v = self.vector(slot, _STRUCTS[fmt].size)
        if v is None or v[1] == 0:
            return []
        return list(struct.unpack_from(f"<{v[1]}{fmt[-1]}", self.r.d, v[0]))

    def array(self, slot: int, dtype: str) -> "np.ndarray":
        """A numeric vector as a (read-only) numpy array, for long per-channel vectors."""
        dt = np.dtype(dtype)
        v = self.vector(slot, dt.itemsize)
        if v is None or v[1] == 0:
            return np.zeros(0, dt)
        return np.frombuffer(self.r.d, dt, v[1], v[0])

    def tables(self, slot: int) -> List["_Table"]:
        v = self.vector(slot, 4)
        if v is None:
            return []
        start, length = v
        return [self.r.table(self.r.indirect(start + 4 * i)) for i in range(length)]

    def table_field(self, slot: int) -> Optional["_Table"]:
        o = self._off(slot)
        return self.r.table(self.r.indirect(self.pos + o)) if o else None

    def string(self, slot: int) -> Optional[bytes]:
        v = self.vector(slot, 1)
        if v is None:
            return None
        start, length = v
        return bytes(self.r.d[start:start + length])


def check_model_structure(data: bytes, name: str = "<bytes>") -> Structure:
    """Refuse a TFLite flatbuffer whose structure a runtime could crash on.

    Args:
        data: the file's bytes (already known to carry the ``TFL3`` identifier).
        name: the file, for messages.

    Returns:
        Counts of what was checked.

    Raises:
        ModelError: one line saying what is wrong, naming the file.
    """
    try:
        return _check(_Reader(data))
    except _Bad as exc:
        raise ModelError(f"model file is malformed ({exc}): {name!r}") from None
    except (struct.error, IndexError, ValueError, OverflowError, MemoryError) as exc:
        raise ModelError(f"model file is malformed ({type(exc).__name__}): {name!r}") from None


def _check(r: _Reader) -> Structure:
    model = r.table(r.get("<I", 0))
    version = model.scalar(0, "<I")
    if version != SCHEMA_VERSION:
        raise _Bad(f"schema version {version}, expected {SCHEMA_VERSION}")
    opcodes = model.tables(1)
    for i, oc in enumerate(opcodes):
        code = max(oc.scalar(0, "<b"), oc.scalar(3, "<i"))
        if code < 0:
            raise _Bad(f"operator code {i} is {code}")
        if code == _CUSTOM and not oc.string(1):
            raise _Bad(f"custom operator code {i} has no name")
    buffers = model.tables(4)
    has_data = []
    data_len = []
    for i, b in enumerate(buffers):
        v = b.vector(0, 1)
        if v is not None:
            has_data.append(v[1] > 0)
            data_len.append(v[1])
            continue
        offset, size = b.scalar(1, "<Q"), b.scalar(2, "<Q")
        if offset or size:
            if offset <= 1 or offset + size > r.n:
                raise _Bad(f"buffer {i} points outside the file")
        has_data.append(size > 0)
        data_len.append(size)
    subgraphs = model.tables(2)
    if not subgraphs:
        raise _Bad("no subgraph")
    n_ops = n_tensors = 0
    for si, g in enumerate(subgraphs):
        n_tensors += _check_subgraph(si, g, opcodes, has_data, data_len)
        n_ops += len(g.tables(3))
    signatures = model.tables(7)
    if len(signatures) > MAX_SIGNATURES:
        raise _Bad(f"{len(signatures)} signatures, more than the {MAX_SIGNATURES} a model may carry")
    for k, sd in enumerate(signatures):
        sub = sd.scalar(4, "<I")
        if sub >= len(subgraphs):
            raise _Bad(f"signature {k} names subgraph {sub} of {len(subgraphs)}")
        n = len(subgraphs[sub].tables(0))
        for slot in (0, 1):
            for tm in sd.tables(slot):
                t = tm.scalar(1, "<I")
                if t >= n:
                    raise _Bad(f"signature {k} names tensor {t} of {n}")
    metadata = model.tables(6)
    if len(metadata) > MAX_METADATA:
        raise _Bad(f"{len(metadata)} metadata entries, more than the {MAX_METADATA} a model may carry")
    for m in metadata:
        if len(m.string(0) or "") > MAX_NAME:
            raise _Bad(f"a metadata entry's name is longer than {MAX_NAME} characters")
        if m.scalar(1, "<I") >= len(buffers):
            raise _Bad("a metadata entry points at a buffer that does not exist")
    return Structure(len(subgraphs), n_ops, n_tensors, len(buffers))


@dataclass
class _Tensors:
    """What the operator checks need to know of a subgraph's tensors, by index."""

    types: List[int] = field(default_factory=list)
    constant: List[bool] = field(default_factory=list)
    variable: List[bool] = field(default_factory=list)
    scales: list = field(default_factory=list)


def _check_subgraph(si: int, g: _Table, opcodes: List[_Table], has_data: List[bool], data_len: List[int]) -> int:
    """Check one subgraph: its tensors, inputs and outputs, and operators; the number of tensors."""
    tensors = g.tables(0)
    nt = len(tensors)
    if nt > MAX_TENSORS:
        raise _Bad(f"subgraph {si} has {nt} tensors")
    facts = _Tensors()
    for ti, t in enumerate(tensors):
        _check_tensor(ti, t, has_data, data_len, facts)
    inputs, outputs = g.ints(1), g.ints(2)
    for what, vec in (("input", inputs), ("output", outputs)):
        for t in vec:
            if not 0 <= t < nt:
                raise _Bad(f"subgraph {si} {what} is tensor {t} of {nt}")
    ops = g.tables(3)
    if len(ops) > MAX_OPERATORS:
        raise _Bad(f"subgraph {si} has {len(ops)} operators")
    produced = [False] * nt
    graph_inputs = set(inputs)
    for oi, op in enumerate(ops):
        _check_operator(oi, op, opcodes, facts, graph_inputs, produced)
    for t in outputs:
        if not (produced[t] or facts.constant[t] or facts.variable[t] or t in graph_inputs):
            raise _Bad(f"subgraph {si} output tensor {t} is never written")
    return nt


def _check_tensor(ti: int, t: _Table, has_data: List[bool], data_len: List[int], facts: _Tensors) -> None:
    """Check one tensor (type, buffer, shape, data length, quantisation) and record its facts."""
    n_buffers = len(has_data)
    shape = t.ints(0)
    ttype = t.scalar(1, "<b")
    if ttype not in _ELEMENT_SIZE:
        raise _Bad(f"tensor {ti} has unknown type {ttype}")
    buf = t.scalar(2, "<I")
    if buf >= n_buffers and buf != 0:  # buffer 0 is the "no data" sentinel, even without a buffer table
        raise _Bad(f"tensor {ti} points at buffer {buf} of {n_buffers}")
    if any(d < 0 for d in shape):
        raise _Bad(f"tensor {ti} has a negative dimension {shape}")
    elements = math.prod(shape) if shape else 1
    if elements > MAX_ELEMENTS:
        raise _Bad(f"tensor {ti} has {elements} elements")
    is_const = 0 < buf < n_buffers and has_data[buf]
    size = _ELEMENT_SIZE[ttype]
    if is_const and size is not None and data_len[buf] != elements * size:
        raise _Bad(f"tensor {ti} holds {data_len[buf]} bytes of data, its shape {shape} needs {elements * size}")
    q = t.table_field(4)
    facts.scales.append(_check_quantisation(ti, q, shape, ttype) if q is not None else [])
    facts.types.append(ttype)
    facts.constant.append(is_const)
    facts.variable.append(bool(t.scalar(5, "<B")))


def _check_operator(oi: int, op: _Table, opcodes: List[_Table], facts: _Tensors, graph_inputs: set,
                    produced: List[bool]) -> None:
    """Check one operator's code and tensors in graph order; mark the tensors it writes."""
    nt = len(produced)
    code_index = op.scalar(0, "<I")
    if code_index >= len(opcodes):
        raise _Bad(f"operator {oi} uses operator code {code_index} of {len(opcodes)}")
    oc = opcodes[code_index]
    code = max(oc.scalar(0, "<b"), oc.scalar(3, "<i"))
    op_in, op_out, inter = op.ints(1), op.ints(2), op.ints(9)
    for t in op_in:
        if not -1 <= t < nt:
            raise _Bad(f"operator {oi} input is tensor {t} of {nt}")
        if t >= 0 and not (produced[t] or facts.constant[t] or facts.variable[t] or t in graph_inputs):
            raise _Bad(f"operator {oi} reads tensor {t} before anything writes it")
    for t in op_out + inter:
        if not 0 <= t < nt:
            raise _Bad(f"operator {oi} output is tensor {t} of {nt}")
    for t in op_out:
        if facts.constant[t] or t in graph_inputs:
            raise _Bad(f"operator {oi} writes tensor {t}, a {'constant' if facts.constant[t] else 'graph input'}")
        if produced[t] and not facts.variable[t]:
            raise _Bad(f"tensor {t} is written by two operators")
        produced[t] = True
    if code in _QUANTISED_ARITHMETIC and op_in and op_in[0] >= 0 and facts.types[op_in[0]] in _QUANT_RANGE:
        for t in [x for x in op_in if x >= 0] + op_out:
            if facts.types[t] in _QUANT_RANGE and not facts.constant[t]:
                scales = facts.scales[t]
                if not len(scales) or not (scales > 0).all():
                    raise _Bad(f"operator {oi}: quantised tensor {t} has no positive scale")


def _check_quantisation(ti: int, q: _Table, shape: List[int], ttype: int) -> List[float]:
    scales = q.array(2, "<f4")
    zeros = q.array(3, "<i8")
    for v in (q.array(0, "<f4"), q.array(1, "<f4"), scales):
        if len(v) and not np.isfinite(v).all():
            raise _Bad(f"tensor {ti} has a quantisation value that is not finite")
    if len(scales) and (scales < 0).any():
        raise _Bad(f"tensor {ti} has a negative quantisation scale")
    if len(zeros) and len(scales) and len(zeros) != len(scales):
        raise _Bad(f"tensor {ti} has {len(scales)} scales but {len(zeros)} zero points")
    if len(scales) > 1:
        dim = q.scalar(6, "<i")
        if not 0 <= dim < len(shape) or shape[dim] != len(scales):
            raise _Bad(f"tensor {ti} has {len(scales)} per-channel scales along dimension {dim} of shape {shape}")
    lo_hi = _QUANT_RANGE.get(ttype)
    if lo_hi and len(zeros) and len(scales) == 1 and not lo_hi[0] <= int(zeros[0]) <= lo_hi[1]:
        raise _Bad(f"tensor {ti} has zero point {int(zeros[0])} outside its type")
    return scales
