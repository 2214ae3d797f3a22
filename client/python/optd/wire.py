"""The wire dtypes of optd.v1 (fp32, bf16, fp16) for numpy arrays.

bf16 rounds to nearest even and keeps NaN a NaN, bit for bit as the daemon's kernels
(kernels/formulas.h FloatToBf16Bits) and torch's .bfloat16() do; fp16 is numpy's IEEE binary16
(round to nearest even, subnormals, overflow to infinity), as the daemon's FloatToHalfBits.
"""

import numpy as np

from optd.v1 import optd_pb2

# name -> (enum value, bytes per element)
DTYPES = {
    "fp32": (optd_pb2.DTYPE_FP32, 4),
    "bf16": (optd_pb2.DTYPE_BF16, 2),
    "fp16": (optd_pb2.DTYPE_FP16, 2),
}
NAMES = {value: name for name, (value, _) in DTYPES.items()}


def dtype_value(name):
    """The optd.v1.DType of "fp32", "bf16" or "fp16"; ValueError for anything else."""
    try:
        return DTYPES[name][0]
    except KeyError:
        raise ValueError(f"wire dtype {name!r} is not one of fp32, bf16, fp16") from None


def element_bytes(name):
    return DTYPES[name][1]


def to_bf16_bits(values):
    """float32 array -> uint16 bf16 bits (round to nearest even, NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return np.where((bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000), quiet_nan, rounded)


def from_bf16_bits(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_half_bits(values, name):
    """float32 array -> uint16 bits in "bf16" or "fp16", rounded as the wire rounds them."""
    if name == "bf16":
        return to_bf16_bits(values)
    with np.errstate(over="ignore"):  # beyond ±65504 is ±inf, as the daemon's rule has it
        return np.ascontiguousarray(values, dtype=np.float32).astype(np.float16).view(np.uint16)


def from_half_bits(bits, name):
    """float32 array from uint16 bits in "bf16" or "fp16" (exact)."""
    if name == "bf16":
        return from_bf16_bits(bits)
    return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)


def encode(values, name):
    """Little-endian wire bytes of a float32 array in dtype `name`."""
    if name == "fp32":
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    if name in ("bf16", "fp16"):
        return to_half_bits(values, name).astype("<u2").tobytes()
    raise ValueError(f"wire dtype {name!r} is not one of fp32, bf16, fp16")


def decode(data, dtype_value_):
    """float32 array from wire bytes of the optd.v1.DType `dtype_value_`."""
    name = NAMES.get(dtype_value_)
    if name == "fp32":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if name in ("bf16", "fp16"):
        return from_half_bits(np.frombuffer(data, dtype="<u2"), name)
    raise ValueError(f"chunk dtype {dtype_value_} is not a wire dtype")


def round_to(values, name):
    """What `values` become after a trip over the wire in dtype `name`."""
    return decode(encode(values, name), DTYPES[name][0])
