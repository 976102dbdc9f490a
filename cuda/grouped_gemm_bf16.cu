// Grouped-GEMM kernels for bf16 A and B (output bf16 or fp32), every tile shape.
#include "grouped_gemm_kernel.cuh"

template cudaError_t moek::launch_grouped_gemm<__nv_bfloat16>(const moek::GemmParams&, moek_gemm_tile, moek_dtype,
                                                    cudaStream_t);
