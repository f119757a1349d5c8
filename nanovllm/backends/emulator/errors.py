"""Exceptions of the CUDA emulator. Each says where in the kernel source it happened.

They are RuntimeErrors, not NanovllmError: they report bugs in a kernel or in the glue that
launches it, which is the kernel writer's business, not the user's.
"""


class EmulatorError(RuntimeError):
    """Base class of everything the emulator raises (besides TypeError for bad arguments)."""


class CompileError(EmulatorError):
    """g++ rejected the source, or it uses something the emulator cannot run (inline PTX,
    cp.async, tensor cores, grid-wide sync)."""


class LaunchError(EmulatorError):
    """A launch a GPU would refuse: too many threads, grid or shared memory over the limits,
    more threads than the kernel's __launch_bounds__."""


class DeviceAssertError(EmulatorError):
    """A device-side assert() failed or the kernel called __trap()."""


class SynchronizationError(EmulatorError):
    """A barrier or warp operation that cannot complete on a GPU: deadlock (threads wait at a
    barrier that others never reach), divergent barriers, lanes at different warp operations
    or a mask naming lanes that exited."""


class SharedMemoryError(EmulatorError):
    """Without AddressSanitizer: a block wrote into the redzone around a __shared__ variable
    or past the launch's dynamic shared memory (found after the block; sanitize=True shows
    the line)."""


class AddressSanitizerError(EmulatorError):
    """AddressSanitizer caught an invalid memory access (sanitize=True builds)."""
