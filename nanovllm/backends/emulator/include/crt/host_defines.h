/* Stand-in for CUDA's internal crt/host_defines.h, which the nvidia-cuda-runtime-cu12 pip
 * package does not ship. cuda_fp16.h / cuda_bf16.h (via vector_types.h) include it; for a
 * host compiler (g++) the CUDA execution-space keywords only need to exist and mean nothing.
 * The emulator header (cuda_emulator.h) redefines the ones it gives a meaning to. */
#ifndef NANOVLLM_EMULATOR_HOST_DEFINES_H
#define NANOVLLM_EMULATOR_HOST_DEFINES_H

#define __host__
#define __device__
#define __global__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(n) __align__(n)
#define __thread__ __thread
#define __import__
#define __export__
#define __cdecl
#define __annotate__(a) __attribute__((a))
#define __location__(a)
#define __device_builtin__
#define __device_builtin_texture_type__
#define __device_builtin_surface_type__
#define __cudart_builtin__
#define __launch_bounds__(...)
#define __grid_constant__
#define __nv_pure__
#define CUDARTAPI
#define CUDARTAPI_CDECL

#endif
