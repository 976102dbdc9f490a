// Grouped-GEMM kernels for fp16 A and B (output fp16 or fp32), every tile shape.
#include "grouped_gemm_kernel.cuh"

template cudaError_t moek::launch_grouped_gemm<__half>(const moek::GemmParams&, moek_gemm_tile, moek_dtype,
                                                    cudaStream_t);
