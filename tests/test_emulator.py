"""The CUDA emulator (nanovllm.backends.emulator) runs CUDA sources on the CPU like a GPU would.

Small kernels written here give NumPy's answers under every thread schedule; planted bugs (a
missing barrier, an out-of-bounds read, a wrong argument type, a deadlock, a failed assert, an
impossible launch) are caught with the kernel's file:line; the build cache avoids recompiling.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from nanovllm.backends.emulator import (
    AddressSanitizerError,
    CompileError,
    DeviceAssertError,
    EmulatedModule,
    EmulatorError,
    LaunchError,
    SharedMemoryError,
    SynchronizationError,
)
from nanovllm.backends.emulator import build as emulator_build

SCHEDULES = ("forward", "reverse", "random")

KERNELS = r"""
extern "C" __global__ void vector_add(const float* __restrict__ a, const float* __restrict__ b,
                                      float* __restrict__ out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = a[i] + b[i];
}

// One partial sum per block: a shared-memory tree with a barrier after every step.
extern "C" __global__ void block_sum(const float* x, float* partial, int n) {
  __shared__ float buf[256];
  int t = threadIdx.x;
  int i = blockIdx.x * blockDim.x + t;
  buf[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
    __syncthreads();
  }
  if (t == 0) partial[blockIdx.x] = buf[0];
}

// Warp sums with xor and down shuffles; lane 0 of each warp writes both.
extern "C" __global__ void warp_sums(const float* x, float* xor_sum, float* down_sum) {
  float v = x[blockIdx.x * blockDim.x + threadIdx.x];
  float a = v, b = v;
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_down_sync(0xffffffffu, b, o);
  }
  int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  if (threadIdx.x % 32 == 0) down_sum[warp] = b;
  xor_sum[blockIdx.x * blockDim.x + threadIdx.x] = a;  // every lane has the full sum
}

extern "C" __global__ void votes(const int* pred, unsigned* ballot, int* any, int* all) {
  int p = pred[threadIdx.x];
  unsigned b = __ballot_sync(0xffffffffu, p);
  int y = __any_sync(0xffffffffu, p);
  int z = __all_sync(0xffffffffu, p);
  int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) { ballot[warp] = b; any[warp] = y; all[warp] = z; }
}

// Lanes that exited, or that a partial last warp lacks, do not take part in warp operations.
extern "C" __global__ void ballot_survivors(unsigned* out) {
  if (threadIdx.x % 3 == 0) return;
  unsigned b = __ballot_sync(0xffffffffu, 1);
  if (threadIdx.x == 1 || threadIdx.x == 34) out[threadIdx.x / 32] = b;
}

extern "C" __global__ void atomics(const int* values, int n, int* histogram, int* max_value,
                                   unsigned long long* total, float* fsum) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  atomicAdd(&histogram[values[i] % 8], 1);
  atomicMax(max_value, values[i]);
  atomicAdd(total, (unsigned long long)values[i]);
  // A float sum through atomicCAS, as kernels without native float atomics write it.
  int* address = (int*)fsum;
  int old = *address, assumed;
  do {
    assumed = old;
    old = atomicCAS(address, assumed, __float_as_int(__int_as_float(assumed) + 1.0f));
  } while (assumed != old);
}

// Half and bfloat16 are stored as such and computed in float, as the project's kernels do.
extern "C" __global__ void half_bf16_affine(const __half* x, __half* y, const __nv_bfloat16* u,
                                            __nv_bfloat16* v, float scale, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  y[i] = __float2half(__half2float(x[i]) * scale + 1.0f);
  v[i] = __float2bfloat16(__bfloat162float(u[i]) * scale + 1.0f);
}

// Dynamic shared memory, a 2-D block and a reversal through shared memory.
extern "C" __global__ void reverse_2d(const float* x, float* out) {
  extern __shared__ float tile[];
  int t = threadIdx.y * blockDim.x + threadIdx.x;
  int n = blockDim.x * blockDim.y;
  tile[t] = x[blockIdx.x * n + t];
  __syncthreads();
  out[blockIdx.x * n + t] = tile[n - 1 - t];
}

// Generated per dtype by a macro, as kernels/ does.
template <typename T> __device__ void scale_impl(T* x, float s, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] = (T)((float)x[i] * s);
}
#define DEFINE_SCALE(suffix, T) \
  extern "C" __global__ void scale_##suffix(T* x, float s, int n) { scale_impl<T>(x, s, n); }
DEFINE_SCALE(f32, float)
DEFINE_SCALE(f64, double)

__global__ void not_extern_c(float* x) { x[0] = 1.0f; }

extern "C" __global__ void __launch_bounds__(128) bounded(float* x) { x[threadIdx.x] = 1.0f; }

// 40 KB of static shared memory per instantiation, 280 KB in the module: each kernel fits.
template <int K> __device__ void fill_40kb(float* out) {
  __shared__ float s[10240];
  s[threadIdx.x] = K;
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}
#define DEFINE_FILL(k) extern "C" __global__ void fill_##k(float* out) { fill_40kb<k>(out); }
DEFINE_FILL(1) DEFINE_FILL(2) DEFINE_FILL(3) DEFINE_FILL(4) DEFINE_FILL(5) DEFINE_FILL(6)
DEFINE_FILL(7)

extern "C" __global__ void too_much_static_shared(float* out) {
  __shared__ float big[12 * 1024 + 1];
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = big[threadIdx.x];
}

extern "C" __global__ void read_uninitialised_shared(float* out) {
  __shared__ float never_written[32];
  out[threadIdx.x] = never_written[threadIdx.x];
}
"""

BUGS = r"""
// BUG: no __syncthreads between the write and the neighbour's read.
extern "C" __global__ void shift_no_barrier(const float* x, float* out, int offset) {
  __shared__ float buf[128];
  int t = threadIdx.x;
  buf[t] = x[blockIdx.x * blockDim.x + t];
  out[blockIdx.x * blockDim.x + t] = buf[(t + offset + blockDim.x) % blockDim.x];
}
extern "C" __global__ void shift_with_barrier(const float* x, float* out, int offset) {
  __shared__ float buf[128];
  int t = threadIdx.x;
  buf[t] = x[blockIdx.x * blockDim.x + t];
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = buf[(t + offset + blockDim.x) % blockDim.x];
}

// BUG: no barrier; reads the previous thread's slot (thread 0 writes 0).
extern "C" __global__ void previous_no_barrier(const float* x, float* out) {
  __shared__ float buf[128];
  int t = threadIdx.x;
  buf[t] = x[blockIdx.x * blockDim.x + t];
  out[blockIdx.x * blockDim.x + t] = t > 0 ? buf[t - 1] : 0.0f;
}

// BUG: the tree reduction of block_sum without the barrier inside the loop.
extern "C" __global__ void block_sum_racy(const float* x, float* partial) {
  __shared__ float buf[128];
  int t = threadIdx.x;
  buf[t] = x[blockIdx.x * blockDim.x + t];
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] += buf[t + s];
  }
  if (t == 0) partial[blockIdx.x] = buf[0];
}

// BUG: threads past n return before a barrier the others wait at.
extern "C" __global__ void early_return(float* out, int n) {
  __shared__ float buf[64];
  int t = threadIdx.x;
  if (t >= n) return;
  buf[t] = t;
  __syncthreads();  // EARLY_RETURN_BARRIER
  out[t] = buf[(t + 1) % n];
}

// BUG: the two halves of the block wait at different barriers.
extern "C" __global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();  // DIVERGENT_A
  } else {
    __syncthreads();  // DIVERGENT_B
  }
  out[threadIdx.x] = 1.0f;
}

// BUG: half a warp shuffles while the other half votes, all with the full mask.
extern "C" __global__ void mismatched_warp_ops(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // MISMATCH_SHFL
  else v = __ballot_sync(0xffffffffu, 1);  // MISMATCH_BALLOT
  out[threadIdx.x] = v;
}

extern "C" __global__ void checked(const int* x) {
  assert(x[threadIdx.x] >= 0);  // DEVICE_ASSERT
}

// BUG: reads one element past the end of x.
extern "C" __global__ void off_by_one(const float* x, float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i + 1];  // OOB_READ
}
extern "C" __global__ void in_bounds(const float* x, float* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i];
}
extern "C" __global__ void shared_overrun(float* out) {
  __shared__ float buf[32];
  buf[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x + 1];  // SHARED_OOB
}
extern "C" __global__ void shared_write_overrun(int past) {
  __shared__ float buf[32];
  buf[threadIdx.x + past] = 1.0f;
}
extern "C" __global__ void dynamic_overrun(float* out, int n) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = dyn[threadIdx.x + n];  // DYNAMIC_OOB
}
"""


def line_of(source: str, marker: str) -> int:
    """1-based line of the marker comment in a kernel source."""
    return source[: source.index(marker)].count("\n") + 1


@pytest.fixture(scope="module", autouse=True)
def emulator_cache(tmp_path_factory: pytest.TempPathFactory):
    """Builds go to a fresh cache for this module (never the user's ~/.cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOVLLM_CACHE", str(tmp_path_factory.mktemp("emulator-cache")))
        yield


@pytest.fixture(scope="module")
def kernels():
    modules: dict[str, EmulatedModule] = {}

    def get(schedule: str) -> EmulatedModule:
        if schedule not in modules:
            modules[schedule] = EmulatedModule(KERNELS, schedule=schedule, seed=7)
        return modules[schedule]

    return get


@pytest.fixture(scope="module")
def bugs():
    modules: dict[tuple[str, bool], EmulatedModule] = {}

    def get(schedule: str = "forward", sanitize: bool = False) -> EmulatedModule:
        key = (schedule, sanitize)
        if key not in modules:
            modules[key] = EmulatedModule(BUGS, schedule=schedule, seed=11, sanitize=sanitize)
        return modules[key]

    return get


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (round to nearest even), as __float2bfloat16 does."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---- correct kernels give NumPy's answers under every schedule ------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_vector_add_matches_numpy(kernels, schedule):
    rng = np.random.default_rng(0)
    n = 1000
    a, b = rng.standard_normal(n, np.float32), rng.standard_normal(n, np.float32)
    out = np.zeros(n, np.float32)
    kernels(schedule).get_function("vector_add")(
        ((n + 255) // 256,), (256,), (a, b, out, np.int32(n))
    )
    np.testing.assert_array_equal(out, a + b)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_shared_memory_block_reduction_matches_numpy(kernels, schedule):
    x = np.random.default_rng(1).standard_normal(1000, np.float32)
    partial = np.zeros(4, np.float32)
    kernels(schedule).get_function("block_sum")((4,), (256,), (x, partial, np.int32(1000)))
    expected = [x[i * 256 : (i + 1) * 256].sum(dtype=np.float64) for i in range(4)]
    np.testing.assert_allclose(partial, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_warp_shuffle_reductions_match_numpy(kernels, schedule):
    x = np.random.default_rng(2).standard_normal(128, np.float32)
    xor_sum, down_sum = np.zeros(128, np.float32), np.zeros(4, np.float32)
    kernels(schedule).get_function("warp_sums")((2,), (64,), (x, xor_sum, down_sum))
    warps = x.reshape(4, 32).sum(axis=1, dtype=np.float64)
    np.testing.assert_allclose(down_sum, warps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(xor_sum, np.repeat(warps, 32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ballot_any_all_match_numpy(kernels, schedule):
    pred = np.zeros(96, np.int32)
    pred[[0, 5, 31]] = 1  # warp 0: some lanes
    pred[32:64] = 7  # warp 1: every lane
    ballot, any_, all_ = np.zeros(3, np.uint32), np.zeros(3, np.int32), np.zeros(3, np.int32)
    kernels(schedule).get_function("votes")((1,), (96,), (pred, ballot, any_, all_))
    assert ballot.tolist() == [(1 << 0) | (1 << 5) | (1 << 31), 0xFFFFFFFF, 0]
    assert any_.tolist() == [1, 1, 0]
    assert all_.tolist() == [0, 1, 0]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_exited_and_missing_lanes_do_not_take_part_in_warp_operations(kernels, schedule):
    out = np.zeros(2, np.uint32)
    kernels(schedule).get_function("ballot_survivors")((1,), (48,), (out,))
    alive = [sum(1 << lane for lane in range(32) if w * 32 + lane < 48 and (w * 32 + lane) % 3)
             for w in range(2)]  # fmt: skip
    assert out.tolist() == alive


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_atomics_match_numpy(kernels, schedule):
    values = np.random.default_rng(3).integers(0, 1000, 700).astype(np.int32)
    histogram = np.zeros(8, np.int32)
    max_value = np.full(1, -1, np.int32)
    total = np.zeros(1, np.uint64)
    fsum = np.zeros(1, np.float32)
    kernels(schedule).get_function("atomics")(
        (3,), (256,), (values, np.int32(700), histogram, max_value, total, fsum)
    )
    np.testing.assert_array_equal(histogram, np.bincount(values % 8, minlength=8))
    assert max_value[0] == values.max()
    assert total[0] == values.sum()
    assert fsum[0] == 700.0


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_half_and_bfloat16_loads_and_stores_match_numpy(kernels, schedule):
    n = 300
    x = np.random.default_rng(4).standard_normal(n).astype(np.float16)
    u = bf16_bits(np.random.default_rng(5).standard_normal(n).astype(np.float32))
    y, v = np.zeros(n, np.float16), np.zeros(n, np.uint16)
    scale = np.float32(0.75)
    kernels(schedule).get_function("half_bf16_affine")(
        (2,), (256,), (x, y, u, v, scale, np.int32(n))
    )
    np.testing.assert_array_equal(y, (x.astype(np.float32) * scale + 1.0).astype(np.float16))
    np.testing.assert_array_equal(v, bf16_bits(bf16_value(u) * scale + 1.0))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dynamic_shared_memory_and_2d_blocks(kernels, schedule):
    x = np.arange(3 * 64, dtype=np.float32)
    out = np.zeros_like(x)
    kernels(schedule).get_function("reverse_2d")((3,), (16, 4), (x, out), shared_mem=64 * 4)
    np.testing.assert_array_equal(out, x.reshape(3, 64)[:, ::-1].ravel())


def test_macro_generated_kernels_are_found_with_their_parameter_types(kernels):
    mod = kernels("forward")
    x32, x64 = np.ones(10, np.float32), np.ones(10, np.float64)
    mod.get_function("scale_f32")((1,), (32,), (x32, np.float32(3), np.int32(10)))
    mod.get_function("scale_f64")((1,), (32,), (x64, np.float32(2), np.int32(10)))
    assert x32.tolist() == [3.0] * 10 and x64.tolist() == [2.0] * 10
    params = mod.get_function("scale_f64").signature.params
    assert [(p.name, p.type.spelled) for p in params] == [
        ("x", "double*"),
        ("s", "float"),
        ("n", "int"),
    ]


def test_kernel_without_c_linkage_is_not_found_by_name(kernels):
    with pytest.raises(EmulatorError, match='not extern "C"'):
        kernels("forward").get_function("not_extern_c")


def test_uninitialised_shared_memory_reads_as_poison(kernels):
    out = np.zeros(32, np.float32)
    kernels("forward").get_function("read_uninitialised_shared")((1,), (32,), (out,))
    assert (out.view(np.uint32) == 0xFFFFFFFF).all()


# ---- planted bugs are caught ----------------------------------------------------------------


def _shift(bugs, kernel: str, schedule: str, offset: int) -> bool:
    """True if the shift kernel gave the right answer under this schedule."""
    x = np.arange(256, dtype=np.float32)
    out = np.zeros_like(x)
    bugs(schedule).get_function(kernel)((2,), (128,), (x, out, np.int32(offset)))
    expected = np.roll(x.reshape(2, 128), -offset, axis=1).ravel()
    return bool(np.array_equal(out, expected))


@pytest.mark.parametrize("offset", [1, -1])
def test_missing_syncthreads_gives_a_wrong_answer_under_some_schedule(bugs, offset):
    assert all(_shift(bugs, "shift_with_barrier", s, offset) for s in SCHEDULES)
    assert not all(_shift(bugs, "shift_no_barrier", s, offset) for s in SCHEDULES)


def test_a_race_may_need_a_particular_schedule_to_show(bugs):
    """Why there are several schedules: reading the previous thread's slot without a barrier
    looks right when threads run in index order; the reverse order exposes it."""
    x = np.arange(1, 129, dtype=np.float32)
    expected = np.concatenate([[0.0], x[:-1]])
    right = {}
    for schedule in SCHEDULES:
        out = np.zeros_like(x)
        bugs(schedule).get_function("previous_no_barrier")((1,), (128,), (x, out))
        right[schedule] = bool(np.array_equal(out, expected))
    assert right == {"forward": True, "reverse": False, "random": False}


def test_missing_barrier_in_a_reduction_loop_is_caught(bugs):
    x = np.ones(256, np.float32)
    results = []
    for schedule in SCHEDULES:
        partial = np.zeros(2, np.float32)
        bugs(schedule).get_function("block_sum_racy")((2,), (128,), (x, partial))
        results.append(partial.tolist() == [128.0, 128.0])
    assert not all(results)


def test_early_return_before_a_barrier_is_a_deadlock_with_file_and_line(bugs):
    line = line_of(BUGS, "EARLY_RETURN_BARRIER")
    with pytest.raises(SynchronizationError) as err:
        bugs().get_function("early_return")((1,), (64,), (np.zeros(64, np.float32), np.int32(40)))
    message = str(err.value)
    assert f"kernel.cu:{line}" in message
    assert "threads 0-39" in message and "threads 40-63" in message and "exited" in message


def test_divergent_barriers_are_reported_with_both_lines(bugs):
    with pytest.raises(SynchronizationError, match="divergent") as err:
        bugs().get_function("divergent_barrier")((1,), (64,), (np.zeros(64, np.float32),))
    assert f"kernel.cu:{line_of(BUGS, 'DIVERGENT_A')}" in str(err.value)
    assert f"kernel.cu:{line_of(BUGS, 'DIVERGENT_B')}" in str(err.value)


def test_lanes_at_different_warp_operations_are_reported(bugs):
    with pytest.raises(SynchronizationError, match="different warp operations") as err:
        bugs().get_function("mismatched_warp_ops")((1,), (32,), (np.zeros(32, np.float32),))
    assert "__shfl_xor_sync" in str(err.value) and "__ballot_sync" in str(err.value)


def test_device_assert_raises_with_its_message_and_line(bugs):
    x = np.array([3, 1, -4, 1] * 8, np.int32)
    with pytest.raises(DeviceAssertError) as err:
        bugs().get_function("checked")((1,), (32,), (x,))
    message = str(err.value)
    assert f"kernel.cu:{line_of(BUGS, 'DEVICE_ASSERT')}" in message
    assert "x[threadIdx.x] >= 0" in message and "thread (2,0,0)" in message
    bugs().get_function("checked")((1,), (32,), (np.abs(x),))  # passes when it holds


def test_writes_past_shared_memory_are_caught_without_sanitizer(bugs):
    fn = bugs().get_function("shared_write_overrun")
    fn((1,), (32,), (np.int32(0),))
    with pytest.raises(
        SharedMemoryError, match=r"past the end of __shared__ buf \(kernel\.cu:\d+\)"
    ):
        fn((1,), (32,), (np.int32(1),))
    dyn = bugs().get_function("dynamic_overrun")
    with pytest.raises(SharedMemoryError, match="shared_mem=64 bytes"):
        dyn((1,), (32,), (np.zeros(32, np.float32), np.int32(0)), shared_mem=64)


# ---- AddressSanitizer ------------------------------------------------------------------------


def test_out_of_bounds_read_is_caught_by_address_sanitizer(bugs):
    x, out = np.arange(100, dtype=np.float32), np.zeros(100, np.float32)
    with pytest.raises(AddressSanitizerError) as err:
        bugs(sanitize=True).get_function("off_by_one")((1,), (128,), (x, out, np.int32(100)))
    message = str(err.value)
    assert "heap-buffer-overflow" in message
    assert f"kernel.cu:{line_of(BUGS, 'OOB_READ')}" in message
    assert "argument 0 'x'" in message  # which array was overrun


def test_in_bounds_kernel_passes_under_address_sanitizer_and_writes_back(bugs):
    x, out = np.arange(100, dtype=np.float32), np.zeros(100, np.float32)
    bugs(sanitize=True).get_function("in_bounds")((1,), (128,), (x, out, np.int32(100)))
    np.testing.assert_array_equal(out, x)


def test_shared_memory_overruns_are_caught_by_address_sanitizer(bugs):
    mod = bugs(sanitize=True)
    with pytest.raises(AddressSanitizerError, match="__shared__ buf") as err:
        mod.get_function("shared_overrun")((1,), (32,), (np.zeros(32, np.float32),))
    assert f"kernel.cu:{line_of(BUGS, 'SHARED_OOB')}" in str(err.value)
    # Dynamic shared memory ends at the launch's shared_mem bytes.
    fn = mod.get_function("dynamic_overrun")
    fn((1,), (32,), (np.zeros(32, np.float32), np.int32(0)), shared_mem=32 * 4)
    with pytest.raises(AddressSanitizerError) as err:
        fn((1,), (32,), (np.zeros(32, np.float32), np.int32(1)), shared_mem=32 * 4)
    assert f"kernel.cu:{line_of(BUGS, 'DYNAMIC_OOB')}" in str(err.value)


# ---- arguments are checked as CuPy would marshal them -----------------------------------------


def test_wrong_argument_types_raise_type_error(kernels):
    fn = kernels("forward").get_function("vector_add")
    a = np.zeros(8, np.float32)
    with pytest.raises(TypeError, match=r"vector_add: argument 3 'n' is declared `int`.*np\.int32"):
        fn((1,), (8,), (a, a, a, 8))  # CuPy passes a Python int as 64 bits
    with pytest.raises(
        TypeError, match=r"argument 0 'a' is declared `const float\*` but got a float64"
    ):
        fn((1,), (8,), (a.astype(np.float64), a, a, np.int32(8)))
    with pytest.raises(TypeError, match="takes 4 arguments"):
        fn((1,), (8,), (a, a, a))
    with pytest.raises(TypeError, match="non-contiguous"):
        fn((1,), (8,), (np.zeros(16, np.float32)[::2], a, a, np.int32(8)))
    half = kernels("forward").get_function("half_bf16_affine")
    h, bf = np.zeros(8, np.float16), np.zeros(8, np.uint16)
    with pytest.raises(
        TypeError, match=r"argument 0 'x' is declared `const __half\*` but got a float32"
    ):
        half((1,), (8,), (a, h, bf, bf, np.float32(1), np.int32(8)))
    with pytest.raises(TypeError, match=r"argument 4 'scale' is declared `float`.*Python float"):
        half((1,), (8,), (h, h, bf, bf, 1.0, np.int32(8)))
    fn((1,), (8,), (a, a, a, np.int32(8)))  # the right types pass


# ---- launch limits a GPU enforces --------------------------------------------------------------


def test_launch_limits_are_enforced(kernels):
    mod = kernels("forward")
    fn = mod.get_function("reverse_2d")
    x = np.zeros(2048, np.float32)
    with pytest.raises(LaunchError, match="1025 threads per block exceed the limit of 1024"):
        fn((1,), (205, 5), (x, x))
    with pytest.raises(LaunchError, match="block dimension x = 1025"):
        fn((1,), (1025,), (x, x))
    with pytest.raises(LaunchError, match="block dimension z"):
        fn((1,), (1, 1, 65), (x, x))
    with pytest.raises(LaunchError, match="grid dimension y"):
        fn((1, 65536), (1,), (x, x))
    with pytest.raises(LaunchError, match="max_dynamic_shared_size_bytes"):
        fn((1,), (32,), (x, x), shared_mem=48 * 1024 + 4)
    with pytest.raises(TypeError, match="tuple"):
        fn([1], (32,), (x, x))
    with pytest.raises(LaunchError, match=r"__launch_bounds__\(128\)"):
        mod.get_function("bounded")((1,), (256,), (x,))


def test_static_shared_memory_is_counted_per_kernel(kernels):
    mod = kernels("forward")
    out = np.zeros(32, np.float32)
    # Unknown before the first run: the launch itself finds 40 KB static + 200 KB too much.
    first = mod.get_function("fill_7")
    first.max_dynamic_shared_size_bytes = 200 * 1024
    with pytest.raises(LaunchError, match="40960 bytes of static and 204800 of dynamic"):
        first((1,), (32,), (out,), shared_mem=200 * 1024)
    for k in range(1, 8):  # 280 KB in the module, 40 KB per kernel: every one fits
        mod.get_function(f"fill_{k}")((1,), (32,), (out,))
        assert out.tolist() == [float(k)] * 32
        assert mod.get_function(f"fill_{k}").shared_size_bytes == 40 * 1024
    with pytest.raises(ValueError, match="minus 40960 static"):
        mod.get_function("fill_1").max_dynamic_shared_size_bytes = 190 * 1024
    with pytest.raises(LaunchError, match="49156 bytes of static __shared__ memory"):
        mod.get_function("too_much_static_shared")((1,), (32,), (out,))


def test_more_than_48kb_of_dynamic_shared_memory_after_raising_the_attribute(kernels):
    fn = kernels("forward").get_function("reverse_2d")
    x, out = np.arange(1024, dtype=np.float32), np.zeros(1024, np.float32)
    fn.max_dynamic_shared_size_bytes = 64 * 1024
    fn((1,), (32, 32), (x, out), shared_mem=64 * 1024)
    np.testing.assert_array_equal(out, x[::-1])
    with pytest.raises(ValueError):
        fn.max_dynamic_shared_size_bytes = 228 * 1024


# ---- building ------------------------------------------------------------------------------------


def test_second_build_of_the_same_source_is_a_cache_hit(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path))
    source = 'extern "C" __global__ void one(float* x) { x[threadIdx.x] = 1.0f; }'
    before = emulator_build.stats.compiles
    EmulatedModule(source)
    assert emulator_build.stats.compiles == before + 1
    x = np.zeros(4, np.float32)
    EmulatedModule(source).get_function("one")((1,), (4,), (x,))
    assert emulator_build.stats.compiles == before + 1  # no g++ the second time
    assert x.tolist() == [1.0] * 4
    EmulatedModule(source, ("-DUNUSED=1",))  # other options: another build
    assert emulator_build.stats.compiles == before + 2


def test_compile_errors_name_the_source_line():
    source = 'extern "C" __global__ void broken(float* x) {\n  x[0] = undeclared;\n}\n'
    with pytest.raises(CompileError, match=r"kernel\.cu:2:.*undeclared"):
        EmulatedModule(source)


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (
            'extern "C" __global__ void k(int* x) {\n  asm volatile("membar.gl;");\n}\n',
            r"kernel\.cu:2: inline assembly",
        ),
        (
            '#include <cooperative_groups.h>\nextern "C" __global__ void k(int* x) {}\n',
            r"kernel\.cu:1: cooperative groups",
        ),
        (
            '#include <mma.h>\nextern "C" __global__ void k(int* x) {}\n',
            "wmma",
        ),
    ],
)
def test_what_cannot_run_on_a_cpu_fails_to_compile_with_a_reason(source, reason):
    with pytest.raises(CompileError, match=reason):
        EmulatedModule(source)


def test_unknown_options_are_refused_and_gpu_options_ignored():
    with pytest.raises(CompileError, match="not understood"):
        EmulatedModule('extern "C" __global__ void k() {}', ("--frobnicate",))
    mod = EmulatedModule(
        'extern "C" __global__ void k(int* x) { x[0] = VALUE; }',
        ("--gpu-architecture=sm_90", "-std=c++17", "--use_fast_math", "-DVALUE=5"),
    )
    x = np.zeros(1, np.int32)
    mod.get_function("k")((1,), (1,), (x,))
    assert x[0] == 5


def test_error_messages_use_the_name_of_a_pasted_kernel_file():
    source = '#line 1 "norm.cu"\nextern "C" __global__ void k(float* x) {\n  x[0] = oops;\n}\n'
    with pytest.raises(CompileError, match=re.escape("norm.cu:2")):
        EmulatedModule(source)
