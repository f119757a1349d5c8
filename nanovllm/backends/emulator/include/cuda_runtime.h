/* Stand-in for CUDA's cuda_runtime.h in the CPU emulator: the real header pulls in host-compiler
 * machinery the pip package does not ship, and everything a kernel uses from it (threadIdx,
 * __syncthreads, vector types, ...) is already defined by cuda_emulator.h. */
#pragma once
#include <cuda_fp16.h>
