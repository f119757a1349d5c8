/* cuda_emulator.h: force-included (g++ -include) in front of a CUDA source so that g++ compiles
 * it for the CPU. Every CUDA thread of a block becomes a user-space fiber on ONE OS thread;
 * fibers switch only at __syncthreads, warp operations, atomics and fences, so a block runs
 * deterministically for a given schedule (forward, reverse or seeded random resume order).
 *
 * Layout of this file:
 *   1. includes (CUDA's own cuda_fp16.h / cuda_bf16.h host code gives __half / __nv_bfloat16)
 *   2. CUDA keywords: __global__ / __shared__ / __launch_bounds__ become markers that build.py
 *      rewrites after preprocessing (it needs them to find kernels and dynamic shared memory)
 *   3. the runtime: fibers, the block scheduler, barriers, warp rendezvous, error reporting
 *   4. device API: threadIdx & co., __syncthreads, shuffles, votes, atomics, math, intrinsics
 *   5. the launch entry points Python calls through ctypes
 *
 * Nothing here is meant to be fast in the way a GPU is fast; it is meant to be exact about
 * what a kernel may rely on: uninitialised shared memory reads as 0xFF bytes (NaN / -1), a
 * barrier not reached by every thread is an error, a shuffle whose lanes disagree is an error.
 */
#pragma once

#ifndef __NANOVLLM_EMULATOR__
#define __NANOVLLM_EMULATOR__ 1
#endif

/* ---------------------------------------------------------------- 1. includes */
#include <assert.h>
#include <limits.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <utility>

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define __EMU_ASAN 1
#else
#define __EMU_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

/* A device assert (glibc's assert macro, from any later #include <assert.h> too) lands in the
 * emulator instead of aborting the Python process. */
#define __assert_fail __emu_assert_fail
extern "C" [[noreturn]] void __emu_assert_fail(const char* expr, const char* file, unsigned line,
                                               const char* func) noexcept;

/* ---------------------------------------------------------------- 2. keywords */
#undef __global__
#undef __shared__
#undef __launch_bounds__
#undef __forceinline__
#undef __noinline__
#undef __constant__
#undef __managed__
/* Markers for build.py: it collects kernels from __emu_global__, rewrites __emu_shared__
 * declarations (see "shared memory" below), and checks __launch_bounds__ at launch time. */
#define __global__ __emu_global__
#define __shared__ __emu_shared__
#define __launch_bounds__(...) __emu_launch_bounds__(__VA_ARGS__)
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __constant__
#define __managed__ __emu_unsupported_managed_memory__

#define __EMU_EXPORT extern "C" __attribute__((visibility("default")))

/* ---------------------------------------------------------------- 3. runtime */
namespace __emu {

enum : unsigned { kWarpSize = 32, kMaxThreads = 1024, kMaxWarps = kMaxThreads / kWarpSize };
/* Largest dynamic shared memory a launch may ask for (H100: 227 KB per block). Python checks
 * the real limits before launching; this only sizes the buffer. */
enum : unsigned long { kMaxDynamicSmem = 227u * 1024u, kMaxStaticSmem = 48u * 1024u };
enum : int { kOk = 0, kErrAssert = 1, kErrSync = 2, kErrLaunch = 3, kErrMemory = 4 };
enum class St : unsigned char { Runnable, Barrier, Warp, Done };
enum Schedule : int { kForward = 0, kReverse = 1, kRandom = 2 };

enum Op : int {
  kSyncthreads, kSyncthreadsCount, kSyncthreadsAnd, kSyncthreadsOr,
  kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncwarp, kMatchAny, kMatchAll,
  kReduceAdd, kReduceMin, kReduceMax, kReduceAnd, kReduceOr, kReduceXor,
};

inline const char* op_name(int op) {
  static const char* const names[] = {
      "__syncthreads()", "__syncthreads_count()", "__syncthreads_and()", "__syncthreads_or()",
      "__shfl_sync()", "__shfl_up_sync()", "__shfl_down_sync()", "__shfl_xor_sync()",
      "__ballot_sync()", "__any_sync()", "__all_sync()", "__syncwarp()", "__match_any_sync()",
      "__match_all_sync()", "__reduce_add_sync()", "__reduce_min_sync()", "__reduce_max_sync()",
      "__reduce_and_sync()", "__reduce_or_sync()", "__reduce_xor_sync()"};
  return names[op];
}

struct Fiber {
  void* sp;  // saved stack pointer while switched out
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  uint3 tid;
  unsigned linear, warp, lane;
  St state;
  // What the fiber waits at (barrier or warp operation) and its operands.
  int op;
  unsigned mask;
  int arg, width;
  unsigned long long value, result;
  const char* file;
  int line;
  void* asan_fake_stack;
};

struct Warp {
  unsigned present;  // lanes that exist (a block's last warp may be partial)
  unsigned waiting;  // lanes parked at a warp operation
  unsigned done;     // lanes that returned from the kernel
};

struct KernelEntry {
  const char* name;
  void (*invoke)(const char* args);
  int nparams;
  const char* const* param_types;  // one descriptor per parameter, see Desc
};

struct State {
  const KernelEntry* kernel;
  const char* args;
  dim3 grid, block;
  uint3 block_idx, thread_idx;  // thread_idx mirrors cur->tid for the threadIdx reference
  unsigned nthreads, nwarps, done, at_barrier;
  Fiber* cur;
  Fiber fibers[kMaxThreads];
  Warp warps[kMaxWarps];
  unsigned order[kMaxThreads];
  int schedule;
  unsigned round_pos;  // position in `order` of the current round
  bool progressed;     // some fiber ran in the current round
  bool from_scheduler; // the switch in progress comes from the scheduler
  unsigned long long rng;
  size_t dyn_smem;
  unsigned long long launch_id;  // numbers launches, so a __shared__ variable counts once each
  size_t launch_static_smem;     // static __shared__ bytes this launch's threads have declared
  int error_kind;
  char error[16384];
  // The scheduler's own context and, for AddressSanitizer, the bounds of its stack.
  void* sched_sp;
#if !defined(__x86_64__)
  ucontext_t sched_ctx;
#endif
  void* sched_fake_stack;
  const void* sched_stack_bottom;
  size_t sched_stack_size;
  // Fiber stacks: one mapping, `capacity` stacks of `stack_size` bytes plus a guard page each.
  char* stacks;
  unsigned capacity;
};

static State g;
static std::mutex g_launch_mutex;  // ctypes drops the GIL: two Python threads may launch at once

#if __EMU_ASAN
static const size_t kStackSize = 1u << 20;  // ASan's redzones make frames several times larger
#else
static const size_t kStackSize = 256u << 10;
#endif
static const size_t kGuard = 4096;

/* -- errors ---------------------------------------------------------------------------- */

static void appendf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
static void appendf(const char* fmt, ...) {
  size_t used = strlen(g.error);
  if (used + 1 >= sizeof g.error) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g.error + used, sizeof g.error - used, fmt, ap);
  va_end(ap);
}

/* The first error of a launch wins; later ones (other threads failing the same way) are noise. */
static bool begin_error(int kind) {
  if (g.error_kind != kOk) return false;
  g.error_kind = kind;
  g.error[0] = 0;
  return true;
}

static void describe_thread(const Fiber* f) {
  appendf("block (%u,%u,%u), thread (%u,%u,%u)", g.block_idx.x, g.block_idx.y, g.block_idx.z,
          f->tid.x, f->tid.y, f->tid.z);
}

/* Groups threads with equal keys into ranges: "threads 0-31 ..., threads 32-63 ...". */
template <class Key, class Print>
static void describe_groups(Key key, Print print) {
  unsigned i = 0;
  while (i < g.nthreads) {
    unsigned j = i + 1;
    while (j < g.nthreads && key(&g.fibers[j]) == key(&g.fibers[i])) j++;
    appendf("\n  thread%s %u", j - i > 1 ? "s" : "", i);
    if (j - i > 1) appendf("-%u", j - 1);
    appendf(" (linear id) ");
    print(&g.fibers[i]);
    i = j;
  }
}

/* -- fibers ------------------------------------------------------------------------------ */

inline void asan_start_switch(void** fake_save, const void* bottom, size_t size) {
#if __EMU_ASAN
  __sanitizer_start_switch_fiber(fake_save, bottom, size);
#else
  (void)fake_save, (void)bottom, (void)size;
#endif
}

inline void asan_finish_switch(void* fake, const void** bottom_old, size_t* size_old) {
#if __EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, bottom_old, size_old);
#else
  (void)fake, (void)bottom_old, (void)size_old;
#endif
}

inline char* stack_bottom(const Fiber* f) {
  return g.stacks + (size_t)(f - g.fibers) * (kStackSize + kGuard) + kGuard;
}

}  // namespace __emu

#if defined(__x86_64__)
/* A context switch saves only what the SysV ABI says a callee must preserve (rbx, rbp,
 * r12-r15; kernels do not change the x87 control word or MXCSR, so those are left alone) and
 * swaps stacks. glibc's swapcontext would also make a sigprocmask system call per switch,
 * which would dominate a kernel with many barriers. */
extern "C" void __emu_ctx_switch(void** save_sp, void* to_sp);
extern "C" void __emu_ctx_start();
asm(R"(
  .text
  .p2align 4
  .globl __emu_ctx_switch
  .hidden __emu_ctx_switch
  .type __emu_ctx_switch, @function
__emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size __emu_ctx_switch, .-__emu_ctx_switch

  .p2align 4
  .globl __emu_ctx_start
  .hidden __emu_ctx_start
  .type __emu_ctx_start, @function
__emu_ctx_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size __emu_ctx_start, .-__emu_ctx_start
)");
#endif

namespace __emu {

[[noreturn]] static void fiber_main(Fiber* f);

#if defined(__x86_64__)
typedef void ucontext_like;
#define SCHED_UCONTEXT nullptr
#define FIBER_UCONTEXT(f) nullptr
#else
typedef ucontext_t ucontext_like;
#define SCHED_UCONTEXT (&g.sched_ctx)
#define FIBER_UCONTEXT(f) (&(f)->ctx)
#endif

#if !defined(__x86_64__)
static void fiber_main_ucontext(unsigned lo, unsigned hi) {
  fiber_main((Fiber*)(((uintptr_t)hi << 32) | lo));
}
#endif

/* Lays out a fresh stack so that the first switch to it "returns" into __emu_ctx_start, which
 * calls fiber_main(f) on a 16-byte aligned stack. Not instrumented: these bytes may still carry
 * the shadow of a previous thread's frames. */
__attribute__((no_sanitize_address)) static void prepare_fiber(Fiber* f) {
#if defined(__x86_64__)
  uintptr_t top = ((uintptr_t)stack_bottom(f) + kStackSize) & ~(uintptr_t)15;
  uint64_t* sp = (uint64_t*)(top - 72);
  sp[0] = 0;                                 // r15
  sp[1] = 0;                                 // r14
  sp[2] = (uint64_t)(uintptr_t)&fiber_main;  // r13
  sp[3] = (uint64_t)(uintptr_t)f;            // r12
  sp[4] = 0;                                 // rbx
  sp[5] = 0;                                 // rbp
  sp[6] = (uint64_t)(uintptr_t)&__emu_ctx_start;
  f->sp = sp;
#else
  getcontext(&f->ctx);
  f->ctx.uc_stack.ss_sp = stack_bottom(f);
  f->ctx.uc_stack.ss_size = kStackSize;
  f->ctx.uc_link = nullptr;
  uintptr_t p = (uintptr_t)f;
  makecontext(&f->ctx, (void (*)())fiber_main_ucontext, 2, (unsigned)(p & 0xffffffffu),
              (unsigned)(p >> 32));
#endif
}

/* The next runnable fiber of the current round (in schedule order), or nullptr when the round
 * is over. A fiber that parks hands over to this fiber directly, not through the scheduler:
 * one stack switch per park instead of two. */
static Fiber* next_runnable() {
  if (g.error_kind != kOk) return nullptr;
  while (g.round_pos < g.nthreads) {
    Fiber* f = &g.fibers[g.order[g.round_pos++]];
    if (f->state == St::Runnable) {
      g.progressed = true;
      return f;
    }
  }
  return nullptr;
}

/* Saves the running context in *save_sp (and the ucontext `from`) and continues `to`, or the
 * scheduler when `to` is nullptr. fake_save: ASan's fake stack of the fiber being left
 * (nullptr when that fiber is finished for good). */
static void switch_to(void** save_sp, ucontext_like* from, Fiber* to, void** fake_save) {
  const void* bottom = to ? stack_bottom(to) : g.sched_stack_bottom;
  size_t size = to ? kStackSize : g.sched_stack_size;
  if (to) {
    g.cur = to;
    g.thread_idx = to->tid;
  }
  asan_start_switch(fake_save, bottom, size);
#if defined(__x86_64__)
  (void)from;
  __emu_ctx_switch(save_sp, to ? to->sp : g.sched_sp);
#else
  (void)save_sp;
  swapcontext(from, to ? &to->ctx : &g.sched_ctx);
#endif
}

/* Scheduler -> the first runnable fiber of a round. Returns when the round is over. */
static void run_round() {
  Fiber* f = next_runnable();
  if (!f) return;
  g.from_scheduler = true;
  switch_to(&g.sched_sp, SCHED_UCONTEXT, f, &g.sched_fake_stack);
  asan_finish_switch(g.sched_fake_stack, nullptr, nullptr);
}

/* The running fiber waits (its state says for what); returns when it runs again. */
static void park() {
  Fiber* f = g.cur;
  g.from_scheduler = false;
  switch_to(&f->sp, FIBER_UCONTEXT(f), next_runnable(), &f->asan_fake_stack);
  asan_finish_switch(f->asan_fake_stack, nullptr, nullptr);
}

/* The running fiber is finished for good: its stack is reused by the next block. */
[[noreturn]] static void leave() {
  Fiber* f = g.cur;
#if __EMU_ASAN
  // The frames on this stack never return, so their redzones would stay poisoned for the
  // next thread that gets the stack; this clears them (it is what longjmp does too).
  __asan_handle_no_return();
#endif
  void* dead;
  g.from_scheduler = false;
  switch_to(&dead, FIBER_UCONTEXT(f), next_runnable(), nullptr);
  __builtin_trap();
}

static void lane_exited(unsigned warp);

static void mark_done(Fiber* f) {
  f->state = St::Done;
  g.done++;
  g.warps[f->warp].done |= 1u << f->lane;
  if (g.warps[f->warp].waiting) lane_exited(f->warp);
}

[[noreturn]] static void fiber_main(Fiber* f) {
  const void* from_bottom = nullptr;
  size_t from_size = 0;
  asan_finish_switch(nullptr, &from_bottom, &from_size);
  if (g.from_scheduler) {  // ASan needs the scheduler's stack bounds to switch back to it
    g.sched_stack_bottom = from_bottom;
    g.sched_stack_size = from_size;
  }
  g.kernel->invoke(g.args);
  mark_done(f);
  leave();
}

/* A thread hit an error it cannot continue from: record it and never run this fiber again.
 * The scheduler sees error_kind and abandons the launch. */
[[noreturn]] static void fiber_abort() {
  mark_done(g.cur);
  leave();
}

/* Called from inside a fiber when the current thread's operation is invalid. */
[[noreturn]] static void thread_error(int kind, const char* file, int line, const char* fmt, ...)
    __attribute__((format(printf, 4, 5)));
[[noreturn]] static void thread_error(int kind, const char* file, int line, const char* fmt, ...) {
  if (begin_error(kind)) {
    appendf("%s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    size_t used = strlen(g.error);
    vsnprintf(g.error + used, sizeof g.error - used, fmt, ap);
    va_end(ap);
    appendf(" [");
    describe_thread(g.cur);
    appendf("]");
  }
  fiber_abort();
}

/* -- block barrier (__syncthreads and its count/and/or forms) --------------------------- */

static void print_wait_site(const Fiber* f) {
  switch (f->state) {
    case St::Done: appendf("have exited"); break;
    case St::Runnable: appendf("are runnable"); break;
    default: appendf("wait at %s (%s:%d)", op_name(f->op), f->file, f->line);
  }
}

struct SiteKey {
  St state;
  int op;
  const char* file;
  int line;
  bool operator==(const SiteKey& o) const {
    return state == o.state && op == o.op && line == o.line &&
           (file == o.file || (file && o.file && strcmp(file, o.file) == 0));
  }
};
inline SiteKey site_key(const Fiber* f) {
  if (f->state == St::Done || f->state == St::Runnable) return {f->state, 0, nullptr, 0};
  return {f->state, f->op, f->file, f->line};
}

/* The last thread to arrive releases everyone, after checking they all wait at the same
 * __syncthreads: on a GPU two different barriers do not pair up (undefined behaviour). */
static void complete_barrier(Fiber* last) {
  SiteKey want = site_key(last);
  for (unsigned i = 0; i < g.nthreads; i++) {
    if (!(site_key(&g.fibers[i]) == want)) {
      if (begin_error(kErrSync)) {
        appendf("divergent barrier in block (%u,%u,%u): threads of one block wait at different "
                "barriers, which never pair up on a GPU:",
                g.block_idx.x, g.block_idx.y, g.block_idx.z);
        describe_groups(site_key, print_wait_site);
      }
      fiber_abort();
    }
  }
  unsigned long long count = 0;
  for (unsigned i = 0; i < g.nthreads; i++) count += g.fibers[i].value;
  unsigned long long result = count;
  if (last->op == kSyncthreadsAnd) result = count == g.nthreads;
  if (last->op == kSyncthreadsOr) result = count != 0;
  for (unsigned i = 0; i < g.nthreads; i++) {
    g.fibers[i].result = result;
    g.fibers[i].state = St::Runnable;
  }
  g.at_barrier = 0;
}

static int block_barrier(int op, int pred, const char* file, int line) {
  Fiber* f = g.cur;
  f->op = op;
  f->value = pred != 0;
  f->file = file;
  f->line = line;
  f->state = St::Barrier;
  if (++g.at_barrier == g.nthreads) complete_barrier(f);
  park();
  return (int)f->result;
}

/* -- warp operations --------------------------------------------------------------------- */

/* PTX shfl semantics (shfl.sync.{idx,up,down,bfly} with c = ((32-width)<<8) | clamp): lanes are
 * split into segments of `width`; a source outside the segment yields the lane's own value. */
static unsigned shfl_source(int op, unsigned lane, int arg, int width) {
  unsigned segmask = (unsigned)(kWarpSize - width) & 31u;
  unsigned min_lane = lane & segmask;
  unsigned max_lane = min_lane | (op == kShflUp ? 0u : (31u & ~segmask));
  int j;
  bool ok;
  switch (op) {
    case kShflIdx:
      j = (int)(min_lane | ((unsigned)arg & 31u & ~segmask));
      ok = (unsigned)j <= max_lane;
      break;
    case kShflUp:
      j = (int)lane - arg;
      ok = j >= (int)max_lane;
      break;
    case kShflDown:
      j = (int)lane + arg;
      ok = j <= (int)max_lane;
      break;
    default:  // kShflXor
      j = (int)(lane ^ (unsigned)arg);
      ok = j <= (int)max_lane;
      break;
  }
  return ok ? (unsigned)j : lane;
}

/* Completes the warp operation `last` waits at, once every lane it names that has not exited
 * has arrived (CUDA: "all non-exited threads named in mask must execute the same intrinsic
 * with the same mask"): computes every participant's result. Returns false, with the error
 * recorded, if the participants disagree on the operation or the mask. */
static bool complete_warp_op(Fiber* last, unsigned lanes_in) {
  Fiber* lanes = &g.fibers[last->warp * kWarpSize];
  for (unsigned l = 0; l < kWarpSize; l++) {
    if (!(lanes_in >> l & 1u)) continue;
    Fiber* o = &lanes[l];
    if (o->op != last->op || o->mask != last->mask) {
      if (begin_error(kErrSync)) {
        appendf("warp %u of block (%u,%u,%u): lanes named in one mask wait at different warp "
                "operations (or with different masks): lane %u at %s mask 0x%08x (%s:%d), lane "
                "%u at %s mask 0x%08x (%s:%d)",
                last->warp, g.block_idx.x, g.block_idx.y, g.block_idx.z, last->lane,
                op_name(last->op), last->mask, last->file, last->line, l, op_name(o->op),
                o->mask, o->file, o->line);
      }
      return false;
    }
  }
  unsigned long long ballot = 0, all_same = 1;
  unsigned long long red = 0;
  bool first = true;
  for (unsigned l = 0; l < kWarpSize; l++) {
    if (!(lanes_in >> l & 1u)) continue;
    unsigned long long v = lanes[l].value;
    if (v) ballot |= 1ull << l;
    if (lanes[l].value != last->value) all_same = 0;
    unsigned u = (unsigned)v;
    int s = (int)u;
    if (first) {
      red = u;
      first = false;
      continue;
    }
    switch (last->op) {
      case kReduceAdd: red = (unsigned)red + u; break;
      case kReduceMin: red = last->arg ? (unsigned)(s < (int)red ? s : (int)red) : (u < red ? u : red); break;
      case kReduceMax: red = last->arg ? (unsigned)(s > (int)red ? s : (int)red) : (u > red ? u : red); break;
      case kReduceAnd: red &= u; break;
      case kReduceOr: red |= u; break;
      case kReduceXor: red ^= u; break;
      default: break;
    }
  }
  for (unsigned l = 0; l < kWarpSize; l++) {
    if (!(lanes_in >> l & 1u)) continue;
    Fiber* o = &lanes[l];
    switch (o->op) {
      case kShflIdx:
      case kShflUp:
      case kShflDown:
      case kShflXor: {
        unsigned src = shfl_source(o->op, l, o->arg, o->width);
        // Reading a lane that does not take part (not in the mask, exited, or past the end of
        // the block) is undefined on a GPU: poison the result.
        o->result = (lanes_in >> src & 1u) ? lanes[src].value : ~0ull;
        break;
      }
      case kBallot: o->result = ballot; break;
      case kAny: o->result = ballot != 0; break;
      case kAll: o->result = ballot == (unsigned long long)lanes_in; break;
      case kSyncwarp: o->result = 0; break;
      case kMatchAny: {
        unsigned long long m = 0;
        for (unsigned k = 0; k < kWarpSize; k++)
          if ((lanes_in >> k & 1u) && lanes[k].value == o->value) m |= 1ull << k;
        o->result = m;
        break;
      }
      case kMatchAll: o->result = all_same ? lanes_in : 0; break;
      default: o->result = red; break;
    }
    o->state = St::Runnable;
  }
  g.warps[last->warp].waiting &= ~lanes_in;
  return true;
}

/* The lanes a warp operation of `f` waits for: those its mask names that have not exited. */
inline unsigned participants(const Fiber* f) {
  const Warp& w = g.warps[f->warp];
  return f->mask & w.present & ~w.done;
}

/* A lane exited: operations of its warp that waited for it may now be complete. */
static void lane_exited(unsigned warp) {
  Warp& w = g.warps[warp];
  for (unsigned l = 0; l < kWarpSize && w.waiting; l++) {
    if (!(w.waiting >> l & 1u)) continue;
    Fiber* f = &g.fibers[warp * kWarpSize + l];
    unsigned lanes_in = participants(f);
    if ((w.waiting & lanes_in) == lanes_in && !complete_warp_op(f, lanes_in)) return;
  }
}

static unsigned long long warp_op(int op, unsigned mask, unsigned long long value, int arg,
                                  int width, const char* file, int line) {
  Fiber* f = g.cur;
  Warp& w = g.warps[f->warp];
  unsigned bit = 1u << f->lane;
  if (!(mask & bit))
    thread_error(kErrSync, file, line,
                 "%s with mask 0x%08x that does not include the calling lane %u", op_name(op),
                 mask, f->lane);
  if ((op == kShflIdx || op == kShflUp || op == kShflDown || op == kShflXor) &&
      (width <= 0 || width > (int)kWarpSize || (width & (width - 1)) != 0))
    thread_error(kErrSync, file, line, "%s with width %d: width must be a power of 2 <= 32",
                 op_name(op), width);
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  f->file = file;
  f->line = line;
  f->state = St::Warp;
  w.waiting |= bit;
  unsigned lanes_in = participants(f);
  if ((w.waiting & lanes_in) == lanes_in && !complete_warp_op(f, lanes_in)) fiber_abort();
  park();
  return f->result;
}

/* Atomics and fences change nothing about correctness here (fibers never interleave inside
 * one), but letting other threads run at them makes spin-waits on a flag terminate and lets
 * the schedules reorder racing atomics. */
inline void yield_point() {
  if (g.cur) park();
}

/* -- the block scheduler ----------------------------------------------------------------- */

inline unsigned long long next_random() {  // splitmix64
  unsigned long long z = (g.rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static void poison_shared();
static void check_shared_redzones();
static void check_smem_limits();

static void report_deadlock() {
  if (!begin_error(kErrSync)) return;
  bool only_barrier = true;
  for (unsigned i = 0; i < g.nthreads; i++) {
    St s = g.fibers[i].state;
    if (s == St::Warp) only_barrier = false;
  }
  if (only_barrier)
    appendf("deadlock in block (%u,%u,%u): threads wait at __syncthreads() while other threads "
            "of the block have exited (every thread of a block must reach each barrier; an "
            "early `return` before a barrier is the usual cause):",
            g.block_idx.x, g.block_idx.y, g.block_idx.z);
  else
    appendf("deadlock in block (%u,%u,%u): no thread can make progress:", g.block_idx.x,
            g.block_idx.y, g.block_idx.z);
  describe_groups(site_key, print_wait_site);
}

static void run_block() {
  unsigned n = g.nthreads;
  g.done = 0;
  g.at_barrier = 0;
  for (unsigned w = 0; w < g.nwarps; w++) {
    unsigned lanes = n - w * kWarpSize < kWarpSize ? n - w * kWarpSize : kWarpSize;
    g.warps[w].present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1u;
    g.warps[w].waiting = 0;
    g.warps[w].done = 0;
  }
  for (unsigned i = 0; i < n; i++) {
    Fiber* f = &g.fibers[i];
    f->state = St::Runnable;
    f->op = -1;
    f->file = nullptr;
    f->line = 0;
    prepare_fiber(f);
  }
  poison_shared();
  for (;;) {
    if (g.schedule == kRandom) {  // a fresh permutation every round
      for (unsigned i = n - 1; i > 0; i--) {
        // Lemire's multiply-shift: a bounded random number without a division.
        unsigned j = (unsigned)(((next_random() >> 32) * (unsigned long long)(i + 1)) >> 32);
        unsigned t = g.order[i];
        g.order[i] = g.order[j];
        g.order[j] = t;
      }
    }
    g.round_pos = 0;
    g.progressed = false;
    run_round();
    if (g.error_kind != kOk || g.done == n) return;
    if (!g.progressed) {
      report_deadlock();
      return;
    }
  }
}

static bool ensure_stacks(unsigned n) {
  if (n <= g.capacity) return true;
  unsigned want = 32;
  while (want < n) want *= 2;
  size_t per = kStackSize + kGuard;
  if (g.stacks) munmap(g.stacks, per * g.capacity);
  g.capacity = 0;
  void* p = mmap(nullptr, per * want, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  g.stacks = (char*)p;
  // A guard page below each stack turns a stack overflow into a fault instead of silently
  // overwriting the neighbouring thread's stack.
  for (unsigned i = 0; i < want; i++) mprotect(g.stacks + i * per, kGuard, PROT_NONE);
  g.capacity = want;
  return true;
}

}  // namespace __emu

/* ---------------------------------------------------------------- shared memory */
/* build.py rewrites each static `__shared__ T name[N];` into
 *     static __emu::Shared<T[N], align> __emu_shared_K_name(...);  auto& name = __emu_shared_K_name.use();
 * (a plain static variable: g++ ignores section attributes on statics of template functions,
 * which is where kernels keep their shared memory). A Shared registers itself the first time
 * a thread passes its declaration; every registered variable is filled with 0xFF before each
 * block, so a read of shared memory no thread of the block wrote shows up (NaN, -1). Redzones
 * surround each value: under ASan an access into them is reported; without it they hold 0xFF
 * and a block that wrote into one fails after the block.
 *
 * Dynamic shared memory (`extern __shared__ T name[]`) is one buffer, __emu_dynamic_smem,
 * that build.py aliases every such name to; it is poisoned the same way for the launch's
 * shared_mem bytes, under ASan the bytes past them are unaddressable, and without ASan the
 * 4 KB past them are a 0xFF canary checked after each block. */
extern "C" __attribute__((visibility("hidden"), aligned(128)))
char __emu_dynamic_smem[__emu::kMaxDynamicSmem];
__attribute__((aligned(128))) char __emu_dynamic_smem[__emu::kMaxDynamicSmem];

namespace __emu {

struct SharedVar {
  char* left;  // the redzone before the value (then the value, then the one after it)
  size_t size, left_size;
  const char* name;
  const char* file;
  int line;
};
enum : unsigned { kMaxSharedVars = 4096 };
enum : size_t { kSharedRedzone = 64, kDynamicCanary = 4096 };
static SharedVar g_shared[kMaxSharedVars];  // zero-initialised before any constructor runs
static unsigned g_shared_count;
static size_t g_shared_bytes;

inline void register_shared(const SharedVar& v) {
  if (g_shared_count == kMaxSharedVars) {
    fprintf(stderr, "nanovllm emulator: more than %u __shared__ variables\n", kMaxSharedVars);
    abort();
  }
  g_shared[g_shared_count++] = v;
  g_shared_bytes += v.size;
  // Registered in the middle of a block: this block sees poison too.
  memset(v.left + v.left_size, 0xFF, v.size);
#if __EMU_ASAN
  ASAN_POISON_MEMORY_REGION(v.left, v.left_size);
  ASAN_POISON_MEMORY_REGION(v.left + v.left_size + v.size, kSharedRedzone);
#else
  memset(v.left, 0xFF, v.left_size);
  memset(v.left + v.left_size + v.size, 0xFF, kSharedRedzone);
#endif
}

/* The value between two redzones: ASan poisons them; without ASan they hold 0xFF, so a read
 * just past the value sees poison and a write there is found after the block. */
template <class T, size_t A>
struct Shared {
  alignas(A) alignas(T) char left[kSharedRedzone > A ? kSharedRedzone : A];
  alignas(A) alignas(T) T value;
  char right[kSharedRedzone];
  unsigned long long launch = 0;
  Shared(const char* name, const char* file, int line) {
    register_shared(SharedVar{left, sizeof(T), sizeof left, name, file, line});
  }
  /* Every pass through the declaration: counts the variable towards this launch's static
   * shared memory (what a GPU reserves per block for this kernel). */
  T& use() {
    if (launch != g.launch_id) {
      launch = g.launch_id;
      g.launch_static_smem += sizeof(T);
    }
    return value;
  }
};

static void poison_shared() {
  for (unsigned i = 0; i < g_shared_count; i++) {
    const SharedVar& v = g_shared[i];
#if __EMU_ASAN
    memset(v.left + v.left_size, 0xFF, v.size);
#else  // the redzones too: a failed launch may have left one written
    memset(v.left, 0xFF, v.left_size + v.size + kSharedRedzone);
#endif
  }
  memset(__emu_dynamic_smem, 0xFF, g.dyn_smem);
#if !__EMU_ASAN
  size_t canary = kMaxDynamicSmem - g.dyn_smem < kDynamicCanary ? kMaxDynamicSmem - g.dyn_smem
                                                                 : kDynamicCanary;
  memset(__emu_dynamic_smem + g.dyn_smem, 0xFF, canary);
#endif
}

inline bool all_ff(const char* p, size_t n) {
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)p[i] != 0xFF) return false;
  return true;
}

/* After a block: the static __shared__ memory its threads declared, which only now is known,
 * must fit what a GPU allows with the launch's dynamic shared memory. */
static void check_smem_limits() {
  size_t st = g.launch_static_smem;
  if (st > kMaxStaticSmem && begin_error(kErrLaunch))
    appendf("kernel %s declares %zu bytes of static __shared__ memory: more than the 48 KB "
            "ptxas accepts (use dynamic shared memory above that)",
            g.kernel->name, st);
  else if (st + g.dyn_smem > kMaxDynamicSmem && begin_error(kErrLaunch))
    appendf("kernel %s: %zu bytes of static and %zu of dynamic shared memory exceed the %lu "
            "bytes a block may have",
            g.kernel->name, st, g.dyn_smem, (unsigned long)kMaxDynamicSmem);
}

/* After a block, without ASan: did it write into a redzone? (ASan reports the access itself.) */
static void check_shared_redzones() {
#if !__EMU_ASAN
  for (unsigned i = 0; i < g_shared_count; i++) {
    const SharedVar& v = g_shared[i];
    bool before = !all_ff(v.left, v.left_size);
    if (before || !all_ff(v.left + v.left_size + v.size, kSharedRedzone)) {
      if (begin_error(kErrMemory))
        appendf("block (%u,%u,%u) wrote %s __shared__ %s (%s:%d); run with sanitize=True to "
                "see the line that did it",
                g.block_idx.x, g.block_idx.y, g.block_idx.z, before ? "before the start of"
                : "past the end of", v.name, v.file, v.line);
      return;
    }
  }
  size_t canary = kMaxDynamicSmem - g.dyn_smem < kDynamicCanary ? kMaxDynamicSmem - g.dyn_smem
                                                                 : kDynamicCanary;
  if (!all_ff(__emu_dynamic_smem + g.dyn_smem, canary) && begin_error(kErrMemory))
    appendf("block (%u,%u,%u) wrote past the end of its dynamic shared memory (the launch gave "
            "shared_mem=%zu bytes); run with sanitize=True to see the line that did it",
            g.block_idx.x, g.block_idx.y, g.block_idx.z, g.dyn_smem);
#endif
}

}  // namespace __emu

/* ---------------------------------------------------------------- 4. device API */

static const uint3& threadIdx = __emu::g.thread_idx;
static const uint3& blockIdx = __emu::g.block_idx;
static const dim3& blockDim = __emu::g.block;
static const dim3& gridDim = __emu::g.grid;
static constexpr int warpSize = 32;

#define __EMU_SITE const char *__emu_file = __builtin_FILE(), int __emu_line = __builtin_LINE()
#define __EMU_AT __emu_file, __emu_line

extern "C" [[noreturn]] void __emu_assert_fail(const char* expr, const char* file, unsigned line,
                                               const char* func) noexcept {
  if (!__emu::g.cur) {  // not inside a launch (cannot happen from kernel code)
    fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, func, expr);
    abort();
  }
  __emu::thread_error(__emu::kErrAssert, file, (int)line, "%s: Assertion `%s` failed.", func,
                      expr);
}

[[noreturn]] inline void __trap(__EMU_SITE) {
  __emu::thread_error(__emu::kErrAssert, __EMU_AT, "__trap() called");
}
[[noreturn]] inline void __brkpt(__EMU_SITE) {
  __emu::thread_error(__emu::kErrAssert, __EMU_AT, "__brkpt() called");
}

/* Called at the top of a kernel that declares __launch_bounds__(max_threads, ...): a GPU
 * refuses a launch with more threads than that ("too many resources requested"). */
inline void __emu_check_launch_bounds(long long max_threads, ...) {
  if (__emu::g.nthreads > (unsigned long long)max_threads && __emu::begin_error(__emu::kErrLaunch))
    __emu::appendf("kernel %s is declared __launch_bounds__(%lld) but was launched with %u "
                   "threads per block: a GPU refuses this launch",
                   __emu::g.kernel->name, max_threads, __emu::g.nthreads);
  if (__emu::g.error_kind != __emu::kOk) __emu::fiber_abort();
}

/* -- barriers and fences -- */
inline void __syncthreads(__EMU_SITE) { __emu::block_barrier(__emu::kSyncthreads, 0, __EMU_AT); }
inline int __syncthreads_count(int pred, __EMU_SITE) {
  return __emu::block_barrier(__emu::kSyncthreadsCount, pred, __EMU_AT);
}
inline int __syncthreads_and(int pred, __EMU_SITE) {
  return __emu::block_barrier(__emu::kSyncthreadsAnd, pred, __EMU_AT);
}
inline int __syncthreads_or(int pred, __EMU_SITE) {
  return __emu::block_barrier(__emu::kSyncthreadsOr, pred, __EMU_AT);
}
inline void __threadfence() { __emu::yield_point(); }
inline void __threadfence_block() { __emu::yield_point(); }
inline void __threadfence_system() { __emu::yield_point(); }
inline void __nanosleep(unsigned) { __emu::yield_point(); }

/* -- warp operations -- */
inline void __syncwarp(unsigned mask = 0xffffffffu, __EMU_SITE) {
  __emu::warp_op(__emu::kSyncwarp, mask, 0, 0, 32, __EMU_AT);
}
/* A GPU knows which lanes are converged; the emulator only knows which have not exited. */
inline unsigned __activemask() {
  const __emu::Warp& w = __emu::g.warps[__emu::g.cur->warp];
  return w.present & ~w.done;
}
inline unsigned __lanemask_lt() { return (1u << __emu::g.cur->lane) - 1u; }

namespace __emu {
template <class T>
inline unsigned long long to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp shuffles move values of at most 8 bytes");
  unsigned long long b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
inline T from_bits(unsigned long long b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}
}  // namespace __emu

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, __EMU_SITE) {
  return __emu::from_bits<T>(
      __emu::warp_op(__emu::kShflIdx, mask, __emu::to_bits(var), src_lane, width, __EMU_AT));
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32, __EMU_SITE) {
  return __emu::from_bits<T>(
      __emu::warp_op(__emu::kShflUp, mask, __emu::to_bits(var), (int)delta, width, __EMU_AT));
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, __EMU_SITE) {
  return __emu::from_bits<T>(
      __emu::warp_op(__emu::kShflDown, mask, __emu::to_bits(var), (int)delta, width, __EMU_AT));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, __EMU_SITE) {
  return __emu::from_bits<T>(
      __emu::warp_op(__emu::kShflXor, mask, __emu::to_bits(var), lane_mask, width, __EMU_AT));
}
inline unsigned __ballot_sync(unsigned mask, int pred, __EMU_SITE) {
  return (unsigned)__emu::warp_op(__emu::kBallot, mask, pred != 0, 0, 32, __EMU_AT);
}
inline int __any_sync(unsigned mask, int pred, __EMU_SITE) {
  return (int)__emu::warp_op(__emu::kAny, mask, pred != 0, 0, 32, __EMU_AT);
}
inline int __all_sync(unsigned mask, int pred, __EMU_SITE) {
  return (int)__emu::warp_op(__emu::kAll, mask, pred != 0, 0, 32, __EMU_AT);
}
inline int __uni_sync(unsigned mask, int pred, __EMU_SITE) {
  unsigned b = (unsigned)__emu::warp_op(__emu::kBallot, mask, pred != 0, 0, 32, __EMU_AT);
  return b == 0 || b == mask;
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value, __EMU_SITE) {
  return (unsigned)__emu::warp_op(__emu::kMatchAny, mask, __emu::to_bits(value), 0, 32, __EMU_AT);
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred, __EMU_SITE) {
  unsigned r =
      (unsigned)__emu::warp_op(__emu::kMatchAll, mask, __emu::to_bits(value), 0, 32, __EMU_AT);
  *pred = r != 0;
  return r;
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, __EMU_SITE) {
  return (unsigned)__emu::warp_op(__emu::kReduceAdd, mask, v, 0, 32, __EMU_AT);
}
inline int __reduce_add_sync(unsigned mask, int v, __EMU_SITE) {
  return (int)__emu::warp_op(__emu::kReduceAdd, mask, (unsigned)v, 1, 32, __EMU_AT);
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, __EMU_SITE) {
  return (unsigned)__emu::warp_op(__emu::kReduceMin, mask, v, 0, 32, __EMU_AT);
}
inline int __reduce_min_sync(unsigned mask, int v, __EMU_SITE) {
  return (int)__emu::warp_op(__emu::kReduceMin, mask, (unsigned)v, 1, 32, __EMU_AT);
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, __EMU_SITE) {
  return (unsigned)__emu::warp_op(__emu::kReduceMax, mask, v, 0, 32, __EMU_AT);
}
inline int __reduce_max_sync(unsigned mask, int v, __EMU_SITE) {
  return (int)__emu::warp_op(__emu::kReduceMax, mask, (unsigned)v, 1, 32, __EMU_AT);
}
inline unsigned __reduce_and_sync(unsigned mask, unsigned v, __EMU_SITE) {
  return (unsigned)__emu::warp_op(__emu::kReduceAnd, mask, v, 0, 32, __EMU_AT);
}
inline unsigned __reduce_or_sync(unsigned mask, unsigned v, __EMU_SITE) {
  return (unsigned)__emu::warp_op(__emu::kReduceOr, mask, v, 0, 32, __EMU_AT);
}
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v, __EMU_SITE) {
  return (unsigned)__emu::warp_op(__emu::kReduceXor, mask, v, 0, 32, __EMU_AT);
}

/* -- atomics: plain read-modify-write (fibers never interleave inside one) -- */
#define __EMU_ATOMIC_RMW(name, T, expr)          \
  inline T name(T* address, T val) {             \
    __emu::yield_point();                        \
    T old = *address;                            \
    *address = (expr);                           \
    return old;                                  \
  }                                              \
  inline T name##_block(T* address, T val) { return name(address, val); } \
  inline T name##_system(T* address, T val) { return name(address, val); }
__EMU_ATOMIC_RMW(atomicAdd, int, old + val)
__EMU_ATOMIC_RMW(atomicAdd, unsigned int, old + val)
__EMU_ATOMIC_RMW(atomicAdd, unsigned long long, old + val)
__EMU_ATOMIC_RMW(atomicAdd, float, old + val)
__EMU_ATOMIC_RMW(atomicAdd, double, old + val)
__EMU_ATOMIC_RMW(atomicAdd, __half, __float2half(__half2float(old) + __half2float(val)))
__EMU_ATOMIC_RMW(atomicAdd, __nv_bfloat16,
                 __float2bfloat16(__bfloat162float(old) + __bfloat162float(val)))
__EMU_ATOMIC_RMW(atomicAdd, __half2, __halves2half2(
                     __float2half(__low2float(old) + __low2float(val)),
                     __float2half(__high2float(old) + __high2float(val))))
__EMU_ATOMIC_RMW(atomicSub, int, old - val)
__EMU_ATOMIC_RMW(atomicSub, unsigned int, old - val)
__EMU_ATOMIC_RMW(atomicExch, int, val)
__EMU_ATOMIC_RMW(atomicExch, unsigned int, val)
__EMU_ATOMIC_RMW(atomicExch, unsigned long long, val)
__EMU_ATOMIC_RMW(atomicExch, float, val)
__EMU_ATOMIC_RMW(atomicMax, int, old > val ? old : val)
__EMU_ATOMIC_RMW(atomicMax, unsigned int, old > val ? old : val)
__EMU_ATOMIC_RMW(atomicMax, long long, old > val ? old : val)
__EMU_ATOMIC_RMW(atomicMax, unsigned long long, old > val ? old : val)
__EMU_ATOMIC_RMW(atomicMin, int, old < val ? old : val)
__EMU_ATOMIC_RMW(atomicMin, unsigned int, old < val ? old : val)
__EMU_ATOMIC_RMW(atomicMin, long long, old < val ? old : val)
__EMU_ATOMIC_RMW(atomicMin, unsigned long long, old < val ? old : val)
__EMU_ATOMIC_RMW(atomicAnd, int, old & val)
__EMU_ATOMIC_RMW(atomicAnd, unsigned int, old & val)
__EMU_ATOMIC_RMW(atomicAnd, unsigned long long, old & val)
__EMU_ATOMIC_RMW(atomicOr, int, old | val)
__EMU_ATOMIC_RMW(atomicOr, unsigned int, old | val)
__EMU_ATOMIC_RMW(atomicOr, unsigned long long, old | val)
__EMU_ATOMIC_RMW(atomicXor, int, old ^ val)
__EMU_ATOMIC_RMW(atomicXor, unsigned int, old ^ val)
__EMU_ATOMIC_RMW(atomicXor, unsigned long long, old ^ val)
__EMU_ATOMIC_RMW(atomicInc, unsigned int, old >= val ? 0u : old + 1u)
__EMU_ATOMIC_RMW(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
#undef __EMU_ATOMIC_RMW

#define __EMU_ATOMIC_CAS(T)                                   \
  inline T atomicCAS(T* address, T compare, T val) {          \
    __emu::yield_point();                                     \
    T old = *address;                                         \
    if (old == compare) *address = val;                       \
    return old;                                               \
  }                                                           \
  inline T atomicCAS_block(T* a, T c, T v) { return atomicCAS(a, c, v); } \
  inline T atomicCAS_system(T* a, T c, T v) { return atomicCAS(a, c, v); }
__EMU_ATOMIC_CAS(int)
__EMU_ATOMIC_CAS(unsigned int)
__EMU_ATOMIC_CAS(unsigned long long)
__EMU_ATOMIC_CAS(unsigned short)
#undef __EMU_ATOMIC_CAS

/* -- cache-hinted loads and stores: plain memory accesses -- */
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }
inline unsigned __isGlobal(const void*) { return 1; }
inline long long clock64() {
  static long long ticks = 0;
  return ticks += 1000;
}

/* -- bit reinterpretation and conversions -- */
inline float __int_as_float(int x) { return __emu::from_bits<float>((unsigned)x); }
inline int __float_as_int(float x) { return (int)(unsigned)__emu::to_bits(x); }
inline float __uint_as_float(unsigned x) { return __emu::from_bits<float>(x); }
inline unsigned __float_as_uint(float x) { return (unsigned)__emu::to_bits(x); }
inline double __longlong_as_double(long long x) {
  return __emu::from_bits<double>((unsigned long long)x);
}
inline long long __double_as_longlong(double x) { return (long long)__emu::to_bits(x); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline long long __float2ll_rz(float x) { return (long long)x; }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline int __double2int_rn(double x) { return (int)nearbyint(x); }
inline float __double2float_rn(double x) { return (float)x; }

/* -- single-precision math CUDA has and libm lacks (fast intrinsics map to the exact ones) -- */
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rz(float a, float b) { return a + b; }
inline float __fmul_rz(float a, float b) { return a * b; }
inline float __fmaf_rz(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float sinpif(float x) { return sinf((float)M_PI * x); }
inline float cospif(float x) { return cosf((float)M_PI * x); }
inline void sincospif(float x, float* s, float* c) { sincosf((float)M_PI * x, s, c); }
inline float normcdff(float x) { return 0.5f * erfcf(-x * (float)M_SQRT1_2); }
inline double normcdf(double x) { return 0.5 * erfc(-x * M_SQRT1_2); }

/* CUDA's global min/max overloads (integers compare as integers, floats like fminf/fmaxf). */
#define __EMU_MINMAX(T)                                        \
  inline T min(T a, T b) { return b < a ? b : a; }             \
  inline T max(T a, T b) { return a < b ? b : a; }
__EMU_MINMAX(int)
__EMU_MINMAX(unsigned int)
__EMU_MINMAX(long)
__EMU_MINMAX(unsigned long)
__EMU_MINMAX(long long)
__EMU_MINMAX(unsigned long long)
#undef __EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline float min(float a, int b) { return fminf(a, (float)b); }
inline float max(float a, int b) { return fmaxf(a, (float)b); }
inline float min(int a, float b) { return fminf((float)a, b); }
inline float max(int a, float b) { return fmaxf((float)a, b); }
inline unsigned min(int a, unsigned b) { return min((unsigned)a, b); }
inline unsigned max(int a, unsigned b) { return max((unsigned)a, b); }
inline unsigned min(unsigned a, int b) { return min(a, (unsigned)b); }
inline unsigned max(unsigned a, int b) { return max(a, (unsigned)b); }

/* -- integer intrinsics -- */
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
  return (x >> 16) | (x << 16);
}
inline int __mul24(int a, int b) { return (int)((a << 8 >> 8) * (b << 8 >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xFFFFFFu) * (b & 0xFFFFFFu); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) {
  return (unsigned)(((unsigned long long)a * b) >> 32);
}
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; i++) r |= (unsigned)((v >> (((s >> (4 * i)) & 7u) * 8)) & 0xFFu) << (8 * i);
  return r;
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  unsigned long long v = ((unsigned long long)hi << 32) | lo;
  return (unsigned)((v << (shift & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  unsigned long long v = ((unsigned long long)hi << 32) | lo;
  return (unsigned)(v >> (shift & 31u));
}
inline int __dp4a(int a, int b, int c) {
  for (int i = 0; i < 4; i++) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
  return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
  for (int i = 0; i < 4; i++) c += ((a >> (8 * i)) & 0xFFu) * ((b >> (8 * i)) & 0xFFu);
  return c;
}

/* -- what the emulator cannot honestly run fails to compile with a reason -- */
namespace nvcuda {
namespace wmma {
template <class T> struct __unsupported { static constexpr bool value = false; };
struct matrix_a;
struct matrix_b;
struct accumulator;
struct row_major;
struct col_major;
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(__unsupported<Use>::value, "wmma / tensor cores cannot run in the CPU emulator");
};
}  // namespace wmma
}  // namespace nvcuda
__attribute__((error("cp.async (__pipeline_*) cannot run in the CPU emulator"))) void
__pipeline_memcpy_async(...);
__attribute__((error("cp.async (__pipeline_*) cannot run in the CPU emulator"))) void
__pipeline_commit(...);
__attribute__((error("cp.async (__pipeline_*) cannot run in the CPU emulator"))) void
__pipeline_wait_prior(...);
__attribute__((error("__cvta_generic_to_shared (cp.async / ldmatrix addressing) cannot run in "
                     "the CPU emulator"))) unsigned
__cvta_generic_to_shared(const void*);

/* ---------------------------------------------------------------- 5. launch entry points */
namespace __emu {

/* Parameter descriptors for Python's argument checks: "<kind>|<const>|<base>|<size>|<align>|
 * <spelled type>" where kind is p (pointer) or v (by value), base names the (pointee) type. */
template <class T> struct Base { static constexpr const char* name = "other"; };
#define __EMU_BASE(T, s) template <> struct Base<T> { static constexpr const char* name = s; };
__EMU_BASE(float, "f32")
__EMU_BASE(double, "f64")
__EMU_BASE(__half, "f16")
__EMU_BASE(__nv_bfloat16, "bf16")
__EMU_BASE(__half2, "f16x2")
__EMU_BASE(__nv_bfloat162, "bf16x2")
__EMU_BASE(bool, "bool")
__EMU_BASE(char, "char")
__EMU_BASE(signed char, "i8")
__EMU_BASE(unsigned char, "u8")
__EMU_BASE(short, "i16")
__EMU_BASE(unsigned short, "u16")
__EMU_BASE(int, "i32")
__EMU_BASE(unsigned int, "u32")
__EMU_BASE(long, "i64")
__EMU_BASE(unsigned long, "u64")
__EMU_BASE(long long, "i64")
__EMU_BASE(unsigned long long, "u64")
__EMU_BASE(void, "void")
__EMU_BASE(float2, "f32x2")
__EMU_BASE(float4, "f32x4")
__EMU_BASE(double2, "f64x2")
__EMU_BASE(int2, "i32x2")
__EMU_BASE(int4, "i32x4")
__EMU_BASE(uint2, "u32x2")
__EMU_BASE(uint4, "u32x4")
#undef __EMU_BASE

template <class T>
constexpr const char* spelled() { return __PRETTY_FUNCTION__; }

template <class T>
struct Desc {
  static const char* get() {
    static char buf[512];
    using P = typename std::remove_pointer<T>::type;
    using B = typename std::remove_cv<P>::type;
    constexpr bool ptr = std::is_pointer<T>::value;
    constexpr bool pp = ptr && std::is_pointer<B>::value;
    const char* base = pp ? "ptr" : (ptr ? Base<B>::name : Base<T>::name);
    size_t bsize = ptr ? (std::is_void<B>::value ? 1 : sizeof(typename std::conditional<std::is_void<B>::value, char, B>::type)) : sizeof(T);
    size_t balign = ptr ? (std::is_void<B>::value ? 1 : alignof(typename std::conditional<std::is_void<B>::value, char, B>::type)) : alignof(T);
    snprintf(buf, sizeof buf, "%c|%d|%s|%zu|%zu|%s", ptr ? 'p' : 'v',
             ptr ? (int)std::is_const<P>::value : 0, base, bsize, balign, spelled<T>());
    return buf;
  }
};

/* Kernel arguments arrive packed in 16-byte slots (Python's marshalling in signature.py). */
enum : unsigned { kArgSlot = 16 };
template <class T>
inline T load_arg(const char* args, size_t i) {
  static_assert(sizeof(T) <= kArgSlot, "kernel parameters larger than 16 bytes are not supported");
  T v;
  memcpy(&v, args + i * kArgSlot, sizeof(T));
  return v;
}

template <auto F> struct Entry;
template <class... A, void (*F)(A...)>
struct Entry<F> {
  template <size_t... I>
  static void call(const char* args, std::index_sequence<I...>) {
    F(load_arg<A>(args, I)...);
  }
  static void invoke(const char* args) { call(args, std::index_sequence_for<A...>{}); }
  static const char* const* params() {
    static const char* descs[sizeof...(A) + 1] = {Desc<A>::get()..., nullptr};
    return descs;
  }
  static KernelEntry make(const char* name) {
    return KernelEntry{name, &invoke, (int)sizeof...(A), params()};
  }
};

/* Emitted by build.py after the user's code: the table of this module's kernels. */
const KernelEntry* kernel_table(int* count);

}  // namespace __emu

__EMU_EXPORT int emu_abi_version() { return 2; }

__EMU_EXPORT int emu_kernel_count() {
  int n = 0;
  __emu::kernel_table(&n);
  return n;
}

__EMU_EXPORT const char* emu_kernel_name(int k) {
  int n = 0;
  return __emu::kernel_table(&n)[k].name;
}

__EMU_EXPORT int emu_kernel_nparams(int k) {
  int n = 0;
  return __emu::kernel_table(&n)[k].nparams;
}

__EMU_EXPORT const char* emu_kernel_param(int k, int i) {
  int n = 0;
  return __emu::kernel_table(&n)[k].param_types[i];
}

__EMU_EXPORT void* emu_dynamic_smem() { return __emu_dynamic_smem; }

__EMU_EXPORT unsigned long emu_static_smem_bytes() {
  return (unsigned long)__emu::g_shared_bytes;
}

/* dims: grid x,y,z then block x,y,z (validated by Python). Runs every block of the grid and
 * returns 0, or an error kind with the message copied into err; *static_smem gets the static
 * __shared__ memory the kernel declared. */
__EMU_EXPORT int emu_launch(int k, const unsigned* dims, unsigned long dyn_smem, int schedule,
                              unsigned long long seed, const char* args, char* err,
                              unsigned long errcap, unsigned long* static_smem) {
  using namespace __emu;
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  int n = 0;
  g.kernel = &kernel_table(&n)[k];
  g.args = args;
  g.grid = dim3(dims[0], dims[1], dims[2]);
  g.block = dim3(dims[3], dims[4], dims[5]);
  g.nthreads = dims[3] * dims[4] * dims[5];
  g.nwarps = (g.nthreads + kWarpSize - 1) / kWarpSize;
  g.schedule = schedule;
  g.rng = seed;
  g.dyn_smem = dyn_smem;
  g.error_kind = kOk;
  g.error[0] = 0;
  g.launch_id++;
  g.launch_static_smem = 0;
  if (!ensure_stacks(g.nthreads)) {
    snprintf(err, errcap, "could not map %u fiber stacks", g.nthreads);
    return kErrLaunch;
  }
  for (unsigned i = 0; i < g.nthreads; i++) {
    Fiber* f = &g.fibers[i];
    f->linear = i;
    f->tid = make_uint3(i % g.block.x, i / g.block.x % g.block.y, i / (g.block.x * g.block.y));
    f->warp = i / kWarpSize;
    f->lane = i % kWarpSize;
    g.order[i] = schedule == kReverse ? g.nthreads - 1 - i : i;
  }
#if __EMU_ASAN
  // Only the launch's own bytes of the dynamic shared buffer are addressable.
  ASAN_UNPOISON_MEMORY_REGION(__emu_dynamic_smem, dyn_smem);
  ASAN_POISON_MEMORY_REGION(__emu_dynamic_smem + dyn_smem, kMaxDynamicSmem - dyn_smem);
#endif
  unsigned long long nblocks = (unsigned long long)g.grid.x * g.grid.y * g.grid.z;
  // Random block order: i -> (a*i + b) mod nblocks with a coprime to nblocks is a permutation
  // that needs no memory, whatever the grid size.
  unsigned long long a = 1, b = 0;
  if (schedule == kRandom && nblocks > 1) {
    auto gcd = [](unsigned long long x, unsigned long long y) {
      while (y) {
        unsigned long long t = x % y;
        x = y;
        y = t;
      }
      return x;
    };
    do a = next_random() % nblocks; while (a == 0 || gcd(a, nblocks) != 1);
    b = next_random() % nblocks;
  }
  for (unsigned long long i = 0; i < nblocks && g.error_kind == kOk; i++) {
    unsigned long long id = schedule == kReverse ? nblocks - 1 - i
                            : schedule == kRandom ? (unsigned long long)(((unsigned __int128)a * i + b) % nblocks)
                                                  : i;
    g.block_idx = make_uint3((unsigned)(id % g.grid.x), (unsigned)(id / g.grid.x % g.grid.y),
                             (unsigned)(id / ((unsigned long long)g.grid.x * g.grid.y)));
    run_block();
    if (g.error_kind == kOk) check_shared_redzones();
    if (g.error_kind == kOk) check_smem_limits();
  }
  g.cur = nullptr;
  *static_smem = g.launch_static_smem;
  fflush(stdout);  // device printf output appears when the launch ends, as after a GPU sync
#if __EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(__emu_dynamic_smem, kMaxDynamicSmem);
#endif
  if (g.error_kind != kOk) {
    snprintf(err, errcap, "%s", g.error);
#if __EMU_ASAN
    // Abandoned fibers leave their frames' shadow poisoned; the next block reuses the stacks.
    ASAN_UNPOISON_MEMORY_REGION(g.stacks, g.capacity * (kStackSize + kGuard));
#endif
  }
  return g.error_kind;
}

/* A sentinel for build.py: the user's source starts after this point of the preprocessed text. */
namespace __emu { struct user_code_begins_here; }
