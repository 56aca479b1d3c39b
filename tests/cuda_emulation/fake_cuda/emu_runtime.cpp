// The fiber scheduler behind emu_cuda.h: every CUDA thread of a block is a fiber with its own
// stack on the calling OS thread. A fiber runs until it reaches a barrier (or returns), in
// forward and reverse thread order on alternate rounds; when no
// fiber can run, the scheduler releases a warp whose live lanes all wait at a warp barrier, or
// else the block if all its live threads wait at __syncthreads; if neither is possible the
// threads wait at different barriers and the launch fails (a hang on a GPU).
#include <sys/mman.h>

#include <cstdio>

#include "emu_cuda.h"

#if !defined(__x86_64__)
#error "the CUDA emulation's context switch is written for x86-64"
#endif

// Saves the callee-saved registers and the stack pointer to *save_sp, switches to new_sp.
extern "C" void segops_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .globl segops_emu_switch
  .type segops_emu_switch,@function
segops_emu_switch:
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
  .size segops_emu_switch, .-segops_emu_switch
)");

namespace emu {
namespace {

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };
constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kGuardBytes = 4096;

struct Fiber {
  void* sp = nullptr;
  State state = State::kRunnable;
};

struct Scheduler {
  std::vector<unsigned char*> stacks;  // kept across launches
  std::vector<Fiber> fibers;
  void* main_sp = nullptr;
  int current = -1;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
};
Scheduler S;

unsigned char* stack_top(size_t t) {
  while (S.stacks.size() <= t) {
    void* p = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("segops cuda emulation: mmap of a fiber stack");
      std::abort();
    }
    mprotect(p, kGuardBytes, PROT_NONE);  // overflow faults instead of corrupting a neighbour
    S.stacks.push_back(static_cast<unsigned char*>(p));
  }
  return S.stacks[t] + kGuardBytes + kStackBytes;
}

void set_thread_idx(int t) {
  threadIdx = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
}

[[noreturn]] void fiber_entry() {
  S.body(S.ctx);
  S.fibers[S.current].state = State::kDone;
  segops_emu_switch(&S.fibers[S.current].sp, S.main_sp);
  __builtin_unreachable();
}

void wait(State s) {
  Fiber& me = S.fibers[S.current];
  me.state = s;
  segops_emu_switch(&me.sp, S.main_sp);
}

}  // namespace

int tid() { return S.current; }
void block_barrier() { wait(State::kAtBlockBarrier); }
void warp_barrier() { wait(State::kAtWarpBarrier); }

void run_block(int n, void (*body)(void*), void* ctx) {
  S.body = body;
  S.ctx = ctx;
  S.fibers.assign(n, Fiber{});
  for (int t = 0; t < n; ++t) {
    auto top = reinterpret_cast<uintptr_t>(stack_top(t)) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                   // fake return address of fiber_entry
    *--sp = reinterpret_cast<void*>(&fiber_entry);     // where the first switch "returns"
    for (int r = 0; r < 6; ++r) *--sp = nullptr;       // rbp rbx r12 r13 r14 r15
    S.fibers[t].sp = sp;
  }
  int live = n;
  bool reverse = false;
  while (live > 0) {
    // Alternate the order threads reach the next barrier in, so that a missing barrier shows
    // up whichever side of a shared-memory hazard runs first.
    for (int i = 0; i < n; ++i) {
      const int t = reverse ? n - 1 - i : i;
      if (S.fibers[t].state != State::kRunnable) continue;
      S.current = t;
      set_thread_idx(t);
      segops_emu_switch(&S.main_sp, S.fibers[t].sp);
      if (S.fibers[t].state == State::kDone) --live;
    }
    if (live == 0) break;
    reverse = !reverse;
    bool released = false;
    for (int w0 = 0; w0 < n; w0 += kWarp) {
      const int w1 = std::min(n, w0 + kWarp);
      bool any = false, all = true;
      for (int t = w0; t < w1; ++t) {
        if (S.fibers[t].state == State::kAtWarpBarrier) any = true;
        else if (S.fibers[t].state != State::kDone) all = false;
      }
      if (any && all) {
        for (int t = w0; t < w1; ++t)
          if (S.fibers[t].state == State::kAtWarpBarrier) S.fibers[t].state = State::kRunnable;
        released = true;
      }
    }
    if (!released) {
      bool all = true;
      for (int t = 0; t < n && all; ++t)
        all = S.fibers[t].state == State::kAtBlockBarrier || S.fibers[t].state == State::kDone;
      if (all) {
        for (auto& f : S.fibers)
          if (f.state == State::kAtBlockBarrier) f.state = State::kRunnable;
        released = true;
      }
    }
    if (!released) {
      std::fprintf(stderr, "segops cuda emulation: block (%u, %u, %u) deadlocks: its threads wait at "
                   "different barriers (divergent __syncthreads or warp operation)\n",
                   blockIdx.x, blockIdx.y, blockIdx.z);
      last_error = cudaErrorLaunchFailure;
      break;
    }
  }
  S.current = -1;
}

}  // namespace emu
