// CUDA version of the fused Adam/AdamW step in csrc/cpu_adam.cpp: the same element math (cpu_adam.h, with FMA
// rounding, which is what torch's CUDA kernels and the CPU AVX paths use), one thread per element in a
// grid-stride loop. Pointers are device pointers; the C ABI mirrors zt_adam_step so a loader can bind both
// the same way. Built with nvcc and loaded with ctypes by runtime/cuda_adam.py.
#include <cuda_runtime.h>

#include <cstdint>

#include "../cpu_adam.h"

namespace ztune {
namespace {

template <int kGrad, int kOut>
__global__ void adam_step_kernel(float* __restrict__ param, const void* __restrict__ grad,
                                 float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                                 void* __restrict__ out, int64_t n, AdamScalars s) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float p = param[i], m = exp_avg[i], v = exp_avg_sq[i];
    adam_update<true>(load_as_float<kGrad>(grad, i), p, m, v, s);
    param[i] = p;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (kOut != kNone) store_low_precision<kOut>(out, i, p);
  }
}

template <int kGrad, int kOut>
cudaError_t launch(float* param, const void* grad, float* exp_avg, float* exp_avg_sq, void* out, int64_t n,
                   const AdamScalars& s, cudaStream_t stream) {
  constexpr int kThreads = 256;
  // Enough blocks to fill any current GPU several times over; the grid-stride loop covers the rest.
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  const int blocks = static_cast<int>(wanted < 65536 ? wanted : 65536);
  adam_step_kernel<kGrad, kOut><<<blocks, kThreads, 0, stream>>>(param, grad, exp_avg, exp_avg_sq, out, n, s);
  return cudaGetLastError();
}

template <int kGrad>
cudaError_t launch_out(int out_dtype, float* param, const void* grad, float* exp_avg, float* exp_avg_sq,
                       void* out, int64_t n, const AdamScalars& s, cudaStream_t stream) {
  if (out_dtype == kBF16) return launch<kGrad, kBF16>(param, grad, exp_avg, exp_avg_sq, out, n, s, stream);
  if (out_dtype == kF16) return launch<kGrad, kF16>(param, grad, exp_avg, exp_avg_sq, out, n, s, stream);
  return launch<kGrad, kNone>(param, grad, exp_avg, exp_avg_sq, out, n, s, stream);
}

}  // namespace
}  // namespace ztune

extern "C" {

// Asynchronous on `stream`. Returns 0, -2 for a bad dtype code, or the positive cudaError_t of the launch.
int zt_adam_step_cuda(float* param, const void* grad, int grad_dtype, float* exp_avg, float* exp_avg_sq,
                      void* out, int out_dtype, int64_t n, int64_t step, double lr, double beta1, double beta2,
                      double eps, double weight_decay, int adamw, double grad_scale, void* stream) {
  using namespace ztune;
  if (out_dtype != kNone && out_dtype != kBF16 && out_dtype != kF16) return -2;
  if (grad_dtype != kF32 && grad_dtype != kBF16 && grad_dtype != kF16) return -2;
  if (n <= 0) return 0;
  const AdamScalars s = make_adam_scalars(step, lr, beta1, beta2, eps, weight_decay, adamw != 0, grad_scale);
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  cudaError_t err;
  if (grad_dtype == kF32) {
    err = launch_out<kF32>(out_dtype, param, grad, exp_avg, exp_avg_sq, out, n, s, st);
  } else if (grad_dtype == kBF16) {
    err = launch_out<kBF16>(out_dtype, param, grad, exp_avg, exp_avg_sq, out, n, s, st);
  } else {
    err = launch_out<kF16>(out_dtype, param, grad, exp_avg, exp_avg_sq, out, n, s, st);
  }
  return static_cast<int>(err);
}

}  // extern "C"
