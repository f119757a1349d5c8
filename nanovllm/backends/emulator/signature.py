"""Kernel parameter types and argument marshalling, checked the way a GPU cannot check them.

The compiled module describes each parameter as g++ sees it (see `Desc` in cuda_emulator.h),
so typedefs, macros and templates are resolved exactly. Arguments are marshalled as CuPy's
RawKernel marshals them (cupy/cuda/function.pyx): arrays as device pointers, None as a null
pointer, a Python int as a 64-bit integer, a Python float as a double, a NumPy scalar at its
own width. On a GPU a mismatch silently reads garbage; here it raises TypeError naming the
kernel, the parameter and both types.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

SLOT = 16  # bytes per argument in the packed buffer (kArgSlot in cuda_emulator.h)

# Pointee type -> dtypes an array passed for it may have. NumPy has no bfloat16: bf16 data
# travels as its raw uint16 bits (or as ml_dtypes' bfloat16, if someone uses that).
_POINTEE_DTYPES: dict[str, tuple[str, ...]] = {
    "f32": ("float32",), "f64": ("float64",), "f16": ("float16",), "bf16": ("uint16", "bfloat16"),
    "f16x2": ("float16",), "bf16x2": ("uint16", "bfloat16"), "f32x2": ("float32",),
    "f32x4": ("float32",), "f64x2": ("float64",), "i32x2": ("int32",), "i32x4": ("int32",),
    "u32x2": ("uint32",), "u32x4": ("uint32",), "bool": ("bool",), "char": ("int8", "uint8"),
    "i8": ("int8",), "u8": ("uint8", "bool"), "i16": ("int16",), "u16": ("uint16",),
    "i32": ("int32",), "u32": ("uint32",), "i64": ("int64",), "u64": ("uint64",),
    "ptr": ("uint64", "int64"),
}  # fmt: skip
_POINTEE_DTYPE_SETS = {
    base: frozenset(np.dtype(n) for n in names if n != "bfloat16")
    for base, names in _POINTEE_DTYPES.items()
}
_INTEGER_BASES = {"bool", "char", "i8", "u8", "i16", "u16", "i32", "u32", "i64", "u64"}
_SCALAR_DTYPES = {"f32": "float32", "f64": "float64", "f16": "float16", "bf16": "uint16"}
_SCALAR_DTYPE_OBJECTS = {base: np.dtype(name) for base, name in _SCALAR_DTYPES.items()}
_FLOAT64 = np.dtype("float64")
_BYTES = frozenset((np.dtype("uint8"), np.dtype("int8")))


@dataclass(frozen=True, slots=True)
class ParamType:
    """One kernel parameter's type, as the compiled module reports it."""

    pointer: bool
    const: bool  # pointee is const (pointers only)
    base: str  # the (pointee) type: f32, f16, bf16, i32, ..., void, ptr, other
    size: int  # of the pointee for pointers, of the value otherwise
    align: int
    spelled: str  # as g++ spells it, e.g. "const __half*"

    @classmethod
    def parse(cls, desc: str) -> ParamType:
        kind, const, base, size, align, pretty = desc.split("|", 5)
        spelled = pretty.split("[with T = ", 1)[-1].rstrip("]")
        return cls(kind == "p", const == "1", base, int(size), int(align), spelled)


@dataclass(frozen=True, slots=True)
class Param:
    index: int
    name: str | None
    type: ParamType

    def label(self) -> str:
        return f"argument {self.index}" + (f" {self.name!r}" if self.name else "")


@dataclass(frozen=True, slots=True)
class Marshalled:
    """Packed arguments, plus the arrays behind the pointer slots (the sanitizer worker copies
    them into allocations of exactly their size)."""

    buffer: bytes
    arrays: tuple[tuple[int, np.ndarray], ...]  # (slot, array) for every non-null pointer


class Signature:
    """The parameters of one kernel and the checks that turn Python arguments into them."""

    def __init__(self, kernel: str, params: list[Param]) -> None:
        self.kernel = kernel
        self.params = params

    def marshal(self, args: tuple | list) -> Marshalled:
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{self.kernel}: args must be a tuple, got {type(args).__name__}")
        if len(args) != len(self.params):
            names = ", ".join(f"{p.type.spelled} {p.name or ''}".strip() for p in self.params)
            raise TypeError(
                f"{self.kernel} takes {len(self.params)} arguments ({names}), "
                f"but {len(args)} were given"
            )
        buffer = bytearray(SLOT * len(args))
        arrays = []
        for param, arg in zip(self.params, args, strict=True):
            if param.type.pointer:
                if arg is not None:
                    address = self._pointer(param, arg)
                    struct.pack_into("<Q", buffer, SLOT * param.index, address)
                    arrays.append((param.index, arg))
            else:
                data = self._scalar(param, arg)
                buffer[SLOT * param.index : SLOT * param.index + len(data)] = data
        return Marshalled(bytes(buffer), tuple(arrays))

    def _fail(self, param: Param, got: str, hint: str = "") -> TypeError:
        return TypeError(
            f"{self.kernel}: {param.label()} is declared `{param.type.spelled}` but got {got}"
            + (f"; {hint}" if hint else "")
        )

    def _pointer(self, param: Param, arg: object) -> int:
        t = param.type
        if not isinstance(arg, np.ndarray):
            raise self._fail(param, _describe(arg), "pass an array (a device pointer) or None")
        dtype = arg.dtype
        accepted = _POINTEE_DTYPE_SETS.get(t.base)
        if dtype not in (accepted or ()) and not _pointee_ok(t, dtype):
            names = _POINTEE_DTYPES.get(t.base)
            want = " or ".join(names) if names else f"a {t.size}-byte record dtype"
            raise self._fail(
                param,
                f"a {dtype.name} array",
                f"it needs {want} data (the kernel would reinterpret {dtype.name} bytes)",
            )
        if not arg.flags.c_contiguous:
            raise self._fail(param, "a non-contiguous array", "pass np.ascontiguousarray(...)")
        address = arg.__array_interface__["data"][0]
        if address % t.align:
            raise self._fail(
                param,
                f"an array at address {address:#x}",
                f"`{t.spelled}` needs {t.align}-byte alignment (a GPU faults on a misaligned "
                "access)",
            )
        return address

    def _scalar(self, param: Param, arg: object) -> bytes:
        t = param.type
        if isinstance(arg, np.ndarray) or arg is None:
            raise self._fail(param, _describe(arg), "a by-value parameter needs a scalar")
        # What CuPy would put in the parameter slot: (kind, bytes).
        if isinstance(arg, np.generic):
            kind = "float" if arg.dtype.kind in "fc" else "int"
            data = arg.tobytes()
        elif isinstance(arg, bool | int):
            if not -(2**63) <= arg < 2**64:
                raise OverflowError(f"{self.kernel}: {param.label()}: {arg} does not fit 64 bits")
            kind, data = "int", struct.pack("<q" if arg < 2**63 else "<Q", int(arg))
        elif isinstance(arg, float):
            kind, data = "float", struct.pack("<d", arg)
        else:
            raise self._fail(param, _describe(arg), "CuPy cannot pass this type")
        if t.base in _INTEGER_BASES:
            ok = kind == "int" and len(data) == t.size
        elif t.base in _SCALAR_DTYPES:
            want = _SCALAR_DTYPE_OBJECTS[t.base]
            ok = (isinstance(arg, np.generic) and arg.dtype == want) or (
                want == _FLOAT64 and isinstance(arg, float)
            )
        else:  # vector or struct by value: only the width can be checked
            ok = isinstance(arg, np.generic) and len(data) == t.size
        if not ok:
            passed = f"np.{arg.dtype.name}" if isinstance(arg, np.generic) else _describe(arg)
            if not isinstance(arg, np.generic):
                passed = f"Python {passed}"
            raise self._fail(param, f"{passed} ({len(data)} bytes as CuPy passes it)",
                             _scalar_hint(t))  # fmt: skip
        return data


def _pointee_ok(t: ParamType, dtype: np.dtype) -> bool:
    """The slow path of the pointee check: any dtype for void*, raw bytes or a record of the
    right size for a struct, ml_dtypes' bfloat16 for bf16."""
    if t.base == "void":
        return True
    if t.base == "other":
        return (dtype.kind == "V" and dtype.itemsize == t.size) or dtype in _BYTES
    return t.base in ("bf16", "bf16x2") and dtype.name == "bfloat16"


def _scalar_hint(t: ParamType) -> str:
    if t.base in _INTEGER_BASES:
        dtype = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}[t.size]
        if t.base.startswith("u"):
            dtype = "u" + dtype
        if t.base == "bool":
            dtype = "bool_"
        return f"pass np.{dtype}(...)"
    if t.base in _SCALAR_DTYPES:
        return f"pass np.{_SCALAR_DTYPES[t.base]}(...)"
    return f"pass a NumPy scalar of {t.size} bytes"


def _describe(arg: object) -> str:
    if arg is None:
        return "None"
    if isinstance(arg, np.ndarray):
        return f"a {arg.dtype.name} array"
    return f"{type(arg).__module__}.{type(arg).__qualname__}".removeprefix("builtins.")


def signature(kernel: str, descs: list[str], names: tuple[str | None, ...]) -> Signature:
    params = [
        Param(i, names[i] if i < len(names) else None, ParamType.parse(d))
        for i, d in enumerate(descs)
    ]
    return Signature(kernel, params)
