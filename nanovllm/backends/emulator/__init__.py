"""The CUDA emulator: runs the exact kernels/*.cu sources on the CPU, without a GPU.

g++ compiles a kernel source with cuda_emulator.h force-included; each thread of a block runs
as a fiber, switching at barriers and warp operations; shared memory starts poisoned; three
resume orders (schedules) expose missing barriers; AddressSanitizer builds catch
out-of-bounds accesses. The API mirrors CuPy's RawModule / RawKernel so that the CUDA
backend's launch code runs unchanged against NumPy arrays. See docs/kernels.md.
"""

from nanovllm.backends.emulator.errors import (
    AddressSanitizerError,
    CompileError,
    DeviceAssertError,
    EmulatorError,
    LaunchError,
    SharedMemoryError,
    SynchronizationError,
)
from nanovllm.backends.emulator.module import SCHEDULES, EmulatedKernel, EmulatedModule

__all__ = [
    "EmulatedModule",
    "EmulatedKernel",
    "SCHEDULES",
    "EmulatorError",
    "CompileError",
    "LaunchError",
    "DeviceAssertError",
    "SynchronizationError",
    "SharedMemoryError",
    "AddressSanitizerError",
]
