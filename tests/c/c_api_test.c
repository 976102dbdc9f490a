/*
 * The C interface as a C engine uses it: include the header, link libmoe_kernels.a, call it.
 * Without a GPU it checks the CPU-side behaviour (statuses, version, argument errors, size queries);
 * with one it also routes real data and checks known answers. Ends with "N passed, M failed".
 */
#include <cuda_runtime_api.h>
#include "moe_kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>

static int passed = 0, failed = 0;

#define CHECK(cond, ...)                              \
  do {                                                \
    if (cond) {                                       \
      ++passed;                                       \
    } else {                                          \
      ++failed;                                       \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                   \
      fprintf(stderr, "\n");                          \
    }                                                 \
  } while (0)

static moek_route_args topk_args(int64_t tokens, int32_t experts, int32_t k) {
  moek_route_args a;
  memset(&a, 0, sizeof a);
  a.mode = MOEK_ROUTE_TOPK;
  a.score_function = MOEK_SCORE_SOFTMAX;
  a.logits_dtype = MOEK_DTYPE_F32;
  a.num_tokens = tokens;
  a.num_experts = experts;
  a.k = k;
  a.scale = 1.0f;
  return a;
}

static void cpu_side(void) {
  CHECK(moek_version() == MOEK_VERSION_MAJOR * 10000 + MOEK_VERSION_MINOR * 100 + MOEK_VERSION_PATCH,
        "version %u", moek_version());
  CHECK(strcmp(moek_status_string(MOEK_SUCCESS), "success") == 0, "status string");
  CHECK(moek_status_string((moek_status)999) != NULL, "unknown status string");

  CHECK(moek_route(NULL, NULL) == MOEK_ERROR_NULL_POINTER, "NULL args");
  moek_route_args a = topk_args(16, 64, 8);
  CHECK(moek_route(&a, NULL) == MOEK_ERROR_NULL_POINTER, "NULL logits");
  CHECK(strstr(moek_last_error_message(), "logits") != NULL, "message names logits: %s", moek_last_error_message());

  /* Fake device addresses: every check below fails before anything touches them. */
  a.logits = (const void *)0x1000;
  a.topk_ids = (int32_t *)0x2000;
  a.topk_weights = (float *)0x3000;
  a.k = 65;
  CHECK(moek_route(&a, NULL) == MOEK_ERROR_INVALID_K, "k > E");
  a.k = 0;
  CHECK(moek_route(&a, NULL) == MOEK_ERROR_INVALID_K, "k = 0");
  a.k = 8;
  a.mode = MOEK_ROUTE_GROUP_LIMITED;
  a.num_groups = 6;
  a.topk_groups = 2;
  CHECK(moek_route(&a, NULL) == MOEK_ERROR_INVALID_GROUPS, "groups not dividing E");
  a.num_groups = 8;
  a.topk_groups = 9;
  CHECK(moek_route(&a, NULL) == MOEK_ERROR_INVALID_TOPK_GROUPS, "topk_groups > num_groups");
  a.mode = MOEK_ROUTE_SWITCH;
  a.k = 1;
  a.capacity = 0;
  CHECK(moek_route(&a, NULL) == MOEK_ERROR_INVALID_CAPACITY, "capacity 0");
  CHECK(strstr(moek_last_error_message(), "capacity") != NULL, "message names capacity");

  /* Permutation plan: size queries and argument errors. */
  moek_plan_args plan;
  memset(&plan, 0, sizeof plan);
  plan.num_tokens = 100;
  plan.k = 8;
  plan.num_experts = 64;
  plan.row_align = 16;
  int64_t rows = 0;
  size_t plan_bytes = 0;
  CHECK(moek_plan_max_rows(&plan, &rows) == MOEK_SUCCESS && rows == 800 + 64 * 15, "plan rows %lld", (long long)rows);
  CHECK(moek_plan_workspace_size(&plan, &plan_bytes) == MOEK_SUCCESS && plan_bytes > 0, "plan workspace");
  CHECK(moek_plan(&plan, NULL) == MOEK_ERROR_NULL_POINTER, "plan without buffers");
  CHECK(strstr(moek_last_error_message(), "topk_ids") != NULL, "message names topk_ids: %s", moek_last_error_message());
  plan.row_align = 0;
  CHECK(moek_plan_max_rows(&plan, &rows) == MOEK_ERROR_INVALID_VALUE, "row_align 0");

  size_t bytes = 1;
  a = topk_args(16, 64, 8);
  CHECK(moek_route_workspace_size(&a, &bytes) == MOEK_SUCCESS && bytes == 0, "no capacity, no workspace");
  a.capacity = 4;
  CHECK(moek_route_workspace_size(&a, &bytes) == MOEK_SUCCESS && bytes > 0, "capacity workspace %zu", bytes);

  /* The whole layer: a workspace query, then the checks before anything is enqueued. */
  moek_layer_args layer;
  memset(&layer, 0, sizeof layer);
  layer.routing = topk_args(32, 128, 8);
  layer.num_tokens = 32;
  layer.hidden = 2048;
  layer.intermediate = 768;
  layer.activation = MOEK_EPILOGUE_SWIGLU;
  CHECK(moek_layer_workspace_size(&layer, &bytes) == MOEK_SUCCESS && bytes >= 32 * 8 * (2048 * 2 + 768) * 2,
        "layer workspace %zu", bytes);
  CHECK(moek_layer(&layer, NULL) == MOEK_ERROR_NULL_POINTER, "layer without buffers");
  CHECK(strstr(moek_last_error_message(), "x") != NULL, "message names x: %s", moek_last_error_message());
  layer.activation = MOEK_EPILOGUE_IDENTITY;
  CHECK(moek_layer_workspace_size(&layer, &bytes) == MOEK_ERROR_INVALID_VALUE, "identity activation");
  layer.activation = MOEK_EPILOGUE_SWIGLU;
  layer.implementation = MOEK_LAYER_FUSED;
  CHECK(moek_layer_workspace_size(&layer, &bytes) == MOEK_SUCCESS, "fused layer workspace");
  layer.implementation = (moek_layer_impl)7;
  CHECK(moek_layer_workspace_size(&layer, &bytes) == MOEK_ERROR_INVALID_ENUM, "unknown implementation");
  CHECK(strstr(moek_last_error_message(), "implementation") != NULL, "message names implementation: %s",
        moek_last_error_message());

  /* Sub-1-bit: a buffer is validated before anything else sees it. */
  moek_subbit_weights w;
  const unsigned char not_mkt1[64] = {'N', 'O', 'P', 'E'};
  CHECK(moek_subbit_parse(NULL, 64, &w) == MOEK_ERROR_NULL_POINTER, "subbit parse of NULL");
  CHECK(moek_subbit_parse(not_mkt1, sizeof not_mkt1, &w) == MOEK_ERROR_INVALID_VALUE, "subbit parse of a bad magic");
  CHECK(strstr(moek_last_error_message(), "corrupt") != NULL, "message says corrupt: %s", moek_last_error_message());
  moek_subbit_matvec_args mv;
  memset(&mv, 0, sizeof mv);
  CHECK(moek_subbit_matvec(&mv, NULL) == MOEK_ERROR_INVALID_VALUE, "subbit matvec with an empty descriptor");
  CHECK(strstr(moek_last_error_message(), "weights.matrices") != NULL, "message names weights.matrices: %s",
        moek_last_error_message());
  moek_subbit_grouped_gemm_args gg;
  memset(&gg, 0, sizeof gg);
  CHECK(moek_subbit_grouped_gemm(NULL, NULL) == MOEK_ERROR_NULL_POINTER, "subbit grouped gemm of NULL");
  CHECK(moek_subbit_grouped_gemm(&gg, NULL) == MOEK_ERROR_INVALID_VALUE, "subbit grouped gemm, empty descriptor");
  CHECK(strstr(moek_last_error_message(), "weights.matrices") != NULL, "message names weights.matrices: %s",
        moek_last_error_message());
  CHECK(moek_subbit_grouped_gemm_workspace_size(&gg, NULL) == MOEK_ERROR_NULL_POINTER,
        "subbit grouped gemm workspace query without an output");

  /* Low-dimension expert parallelism: the shape and the caller's buffers are checked before anything is
   * enqueued (no GPU needed for any of these). */
  moek_ep_low_dim_group low;
  memset(&low, 0, sizeof low);
  low.group.config.num_ranks = 1;
  low.group.config.num_experts = 8;
  low.group.config.k = 2;
  low.group.config.hidden = 360; /* r */
  low.group.config.max_tokens = 64;
  low.group.config.dtype = MOEK_DTYPE_BF16;
  low.model_hidden = 2880;
  size_t low_bytes = 0;
  CHECK(moek_ep_low_dim_workspace_size(&low, &low_bytes) == MOEK_SUCCESS && low_bytes >= 2 * 64 * 360 * 2,
        "low-dim workspace %zu: %s", low_bytes, moek_last_error_message());
  CHECK(moek_ep_low_dim_workspace_size(NULL, &low_bytes) == MOEK_ERROR_NULL_POINTER, "low-dim NULL group");
  CHECK(moek_ep_low_dim_workspace_size(&low, NULL) == MOEK_ERROR_NULL_POINTER, "low-dim NULL bytes");
  low.model_hidden = 2884;
  CHECK(moek_ep_low_dim_workspace_size(&low, &low_bytes) == MOEK_ERROR_INVALID_VALUE, "H not a multiple of 8");
  CHECK(strstr(moek_last_error_message(), "model_hidden") != NULL, "message names model_hidden: %s",
        moek_last_error_message());
  low.model_hidden = 2880;
  low.group.config.dtype = MOEK_DTYPE_F32;
  CHECK(moek_ep_low_dim_workspace_size(&low, &low_bytes) == MOEK_ERROR_INVALID_DTYPE, "low-dim f32 rows");
  low.group.config.dtype = MOEK_DTYPE_BF16;
  low.group.config.num_ranks = 3;
  CHECK(moek_ep_low_dim_workspace_size(&low, &low_bytes) == MOEK_ERROR_INVALID_RANKS, "ranks not dividing E");
  low.group.config.num_ranks = 1;
  moek_ep_low_dim_dispatch_args ld;
  memset(&ld, 0, sizeof ld);
  ld.group = low;
  ld.num_tokens = 4;
  ld.group.low_dim_workspace_bytes = low_bytes - 1;
  ld.group.low_dim_workspace = (void *)(uintptr_t)4096; /* never dereferenced: refused first */
  CHECK(moek_ep_low_dim_dispatch(&ld, NULL) == MOEK_ERROR_WORKSPACE_TOO_SMALL, "low-dim workspace too small");
  CHECK(strstr(moek_last_error_message(), "low_dim_workspace_bytes") != NULL, "message names it: %s",
        moek_last_error_message());
  ld.group.low_dim_workspace_bytes = low_bytes;
  ld.num_tokens = 65;
  CHECK(moek_ep_low_dim_dispatch(&ld, NULL) == MOEK_ERROR_INVALID_NUM_TOKENS, "low-dim T > max_tokens");
  ld.num_tokens = 4;
  CHECK(moek_ep_low_dim_dispatch(&ld, NULL) == MOEK_ERROR_NULL_POINTER, "low-dim dispatch without x");
  CHECK(strstr(moek_last_error_message(), "x") != NULL, "message names x: %s", moek_last_error_message());
  moek_ep_low_dim_combine_args lc;
  memset(&lc, 0, sizeof lc);
  lc.group = ld.group;
  lc.num_tokens = 4;
  lc.w_up = (const void *)(uintptr_t)8192;
  lc.out = (void *)(uintptr_t)(1 << 20);
  lc.residual = (const void *)(uintptr_t)((1 << 20) + 256); /* inside out's 4 x 2880 bf16 */
  CHECK(moek_ep_low_dim_combine(&lc, NULL) == MOEK_ERROR_INVALID_VALUE, "low-dim residual overlapping out");
  CHECK(strstr(moek_last_error_message(), "overlaps") != NULL, "message says overlaps: %s",
        moek_last_error_message());
}

/* Routes real data on the GPU: top-2 of 4 with a known answer, then Switch with capacity. */
static void gpu_side(void) {
  const float logits[3 * 4] = {0.f, 3.f, 1.f, 2.f,   /* -> 1, 3 */
                               5.f, 5.f, 5.f, 5.f,   /* ties -> 0, 1 */
                               -1.f, -2.f, 4.f, 0.f}; /* -> 2, 3 */
  const int32_t expected[6] = {1, 3, 0, 1, 2, 3};
  void *d_logits = NULL, *d_ids = NULL, *d_w = NULL, *d_dropped = NULL, *d_ws = NULL;
  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream) == cudaSuccess, "stream");
  CHECK(cudaMalloc(&d_logits, sizeof logits) == cudaSuccess, "malloc");
  CHECK(cudaMalloc(&d_ids, 6 * sizeof(int32_t)) == cudaSuccess, "malloc");
  CHECK(cudaMalloc(&d_w, 6 * sizeof(float)) == cudaSuccess, "malloc");
  CHECK(cudaMalloc(&d_dropped, sizeof(int32_t)) == cudaSuccess, "malloc");
  cudaMemcpy(d_logits, logits, sizeof logits, cudaMemcpyHostToDevice);
  cudaMemset(d_ids, 0xff, 6 * sizeof(int32_t));

  moek_route_args a = topk_args(3, 4, 2);
  a.renormalize = 1;
  a.logits = d_logits;
  a.topk_ids = (int32_t *)d_ids;
  a.topk_weights = (float *)d_w;
  CHECK(moek_route(&a, stream) == MOEK_SUCCESS, "route: %s", moek_last_error_message());
  int32_t ids[6];
  float w[6];
  cudaMemcpyAsync(ids, d_ids, sizeof ids, cudaMemcpyDeviceToHost, stream);
  cudaMemcpyAsync(w, d_w, sizeof w, cudaMemcpyDeviceToHost, stream);
  CHECK(cudaStreamSynchronize(stream) == cudaSuccess, "sync");
  for (int i = 0; i < 6; ++i) CHECK(ids[i] == expected[i], "id %d: %d, expected %d", i, ids[i], expected[i]);
  /* Renormalised top-2 of softmax(0,3,1,2): e^3 / (e^3 + e^2). */
  CHECK(fabsf(w[0] - 0.7310586f) < 1e-6f, "weight %f", w[0]);
  CHECK(fabsf(w[2] - 0.5f) < 1e-6f && fabsf(w[3] - 0.5f) < 1e-6f, "tied weights %f %f", w[2], w[3]);

  /* Switch, capacity 1 per expert: token 0 keeps expert 1; tokens 1 (expert 0) and 2 (expert 2) keep
   * theirs; repeating the rows makes the second copies drop. */
  moek_route_args s = topk_args(3, 4, 1);
  s.mode = MOEK_ROUTE_SWITCH;
  s.capacity = 1;
  s.logits = d_logits;
  s.topk_ids = (int32_t *)d_ids;
  s.topk_weights = (float *)d_w;
  s.dropped_count = (int32_t *)d_dropped;
  size_t bytes = 0;
  CHECK(moek_route_workspace_size(&s, &bytes) == MOEK_SUCCESS, "workspace query");
  CHECK(cudaMalloc(&d_ws, bytes) == cudaSuccess, "malloc workspace");
  s.workspace = d_ws;
  s.workspace_bytes = bytes;
  CHECK(moek_route(&s, stream) == MOEK_SUCCESS, "switch: %s", moek_last_error_message());
  int32_t dropped = -1;
  cudaMemcpyAsync(ids, d_ids, 3 * sizeof(int32_t), cudaMemcpyDeviceToHost, stream);
  cudaMemcpyAsync(&dropped, d_dropped, sizeof dropped, cudaMemcpyDeviceToHost, stream);
  CHECK(cudaStreamSynchronize(stream) == cudaSuccess, "sync");
  CHECK(ids[0] == 1 && ids[1] == 0 && ids[2] == 2 && dropped == 0, "switch ids %d %d %d dropped %d", ids[0],
        ids[1], ids[2], dropped);
  /* The same rows as 6 tokens of 2 experts: preferences 1, 1, 0 (tie), 0 (tie), 0, 0. With capacity 1
   * the first token of each expert wins and the other four pairs are dropped. */
  s.num_experts = 2;
  s.num_tokens = 6;
  CHECK(moek_route_workspace_size(&s, &bytes) == MOEK_SUCCESS && bytes <= s.workspace_bytes, "workspace");
  CHECK(moek_route(&s, stream) == MOEK_SUCCESS, "switch 2: %s", moek_last_error_message());
  cudaMemcpyAsync(ids, d_ids, 6 * sizeof(int32_t), cudaMemcpyDeviceToHost, stream);
  cudaMemcpyAsync(&dropped, d_dropped, sizeof dropped, cudaMemcpyDeviceToHost, stream);
  CHECK(cudaStreamSynchronize(stream) == cudaSuccess, "sync");
  const int32_t kept[6] = {1, MOEK_DROPPED_ID, 0, MOEK_DROPPED_ID, MOEK_DROPPED_ID, MOEK_DROPPED_ID};
  for (int i = 0; i < 6; ++i) CHECK(ids[i] == kept[i], "capacity id %d: %d, expected %d", i, ids[i], kept[i]);
  CHECK(dropped == 4, "dropped %d, expected 4", dropped);
  cudaFree(d_logits);
  cudaFree(d_ids);
  cudaFree(d_w);
  cudaFree(d_dropped);
  cudaFree(d_ws);
  cudaStreamDestroy(stream);
}

/* Plan, permute and combine on the GPU: 3 tokens, k = 2, 3 experts, rows of 8 floats. Ids (1,0), (2,-1)
 * and (1,1): expert 0 gets pair 1, expert 1 pairs 0, 4, 5, expert 2 pair 2; pair 3 is dropped. */
static void gpu_permutation(void) {
  const int32_t ids[6] = {1, 0, 2, -1, 1, 1};
  const int32_t want_offsets[4] = {0, 1, 4, 5};
  const int32_t want_row_source[5] = {1, 0, 4, 5, 2};
  enum { T = 3, K = 2, E = 3, H = 8 };
  float x[T * H], want[T * H], out[T * H];
  for (int i = 0; i < T * H; ++i) x[i] = (float)(i % 7) - 2.5f;
  /* With weight 1/2 per kept slot: token 0 has both slots -> x; token 1 one slot -> x/2; token 2 both -> x. */
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < H; ++h) want[t * H + h] = (t == 1 ? 0.5f : 1.0f) * x[t * H + h];
  const float weights[6] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};

  moek_plan_args p;
  memset(&p, 0, sizeof p);
  p.num_tokens = T;
  p.k = K;
  p.num_experts = E;
  p.row_align = 1;
  int64_t max_rows = 0;
  size_t ws_bytes = 0;
  CHECK(moek_plan_max_rows(&p, &max_rows) == MOEK_SUCCESS && max_rows == 6, "max rows %lld", (long long)max_rows);
  CHECK(moek_plan_workspace_size(&p, &ws_bytes) == MOEK_SUCCESS, "plan workspace");

  void *d_ids, *d_counts, *d_offsets, *d_row_source, *d_pair_row, *d_errors, *d_ws, *d_x, *d_rows, *d_w, *d_out;
  cudaMalloc(&d_ids, sizeof ids);
  cudaMalloc(&d_counts, E * sizeof(int32_t));
  cudaMalloc(&d_offsets, (E + 1) * sizeof(int32_t));
  cudaMalloc(&d_row_source, max_rows * sizeof(int32_t));
  cudaMalloc(&d_pair_row, T * K * sizeof(int32_t));
  cudaMalloc(&d_errors, sizeof(int32_t));
  cudaMalloc(&d_ws, ws_bytes);
  cudaMalloc(&d_x, sizeof x);
  cudaMalloc(&d_rows, max_rows * H * sizeof(float));
  cudaMalloc(&d_w, sizeof weights);
  cudaMalloc(&d_out, sizeof out);
  cudaMemcpy(d_ids, ids, sizeof ids, cudaMemcpyHostToDevice);
  cudaMemcpy(d_x, x, sizeof x, cudaMemcpyHostToDevice);
  cudaMemcpy(d_w, weights, sizeof weights, cudaMemcpyHostToDevice);

  p.topk_ids = (const int32_t *)d_ids;
  p.expert_counts = (int32_t *)d_counts;
  p.expert_offsets = (int32_t *)d_offsets;
  p.row_source = (int32_t *)d_row_source;
  p.pair_row = (int32_t *)d_pair_row;
  p.error_count = (int32_t *)d_errors;
  p.workspace = d_ws;
  p.workspace_bytes = ws_bytes;
  CHECK(moek_plan(&p, NULL) == MOEK_SUCCESS, "plan: %s", moek_last_error_message());

  moek_permute_args pa;
  memset(&pa, 0, sizeof pa);
  pa.dtype = MOEK_DTYPE_F32;
  pa.num_tokens = T;
  pa.k = K;
  pa.num_experts = E;
  pa.hidden = H;
  pa.max_rows = max_rows;
  pa.x = d_x;
  pa.row_source = (const int32_t *)d_row_source;
  pa.pair_row = (const int32_t *)d_pair_row;
  pa.expert_offsets = (const int32_t *)d_offsets;
  pa.out = d_rows;
  CHECK(moek_permute(&pa, NULL) == MOEK_SUCCESS, "permute: %s", moek_last_error_message());

  moek_combine_args ca;
  memset(&ca, 0, sizeof ca);
  ca.dtype = MOEK_DTYPE_F32;
  ca.num_tokens = T;
  ca.k = K;
  ca.hidden = H;
  ca.max_rows = max_rows;
  ca.y = d_rows;
  ca.pair_row = (const int32_t *)d_pair_row;
  ca.weights = (const float *)d_w;
  ca.out = d_out;
  CHECK(moek_combine(&ca, NULL) == MOEK_SUCCESS, "combine: %s", moek_last_error_message());

  int32_t offsets[E + 1], row_source[5], errors = -1;
  cudaMemcpy(offsets, d_offsets, sizeof offsets, cudaMemcpyDeviceToHost);
  cudaMemcpy(row_source, d_row_source, sizeof row_source, cudaMemcpyDeviceToHost);
  cudaMemcpy(&errors, d_errors, sizeof errors, cudaMemcpyDeviceToHost);
  cudaMemcpy(out, d_out, sizeof out, cudaMemcpyDeviceToHost);
  for (int i = 0; i <= E; ++i) CHECK(offsets[i] == want_offsets[i], "offset %d: %d", i, offsets[i]);
  for (int i = 0; i < 5; ++i) CHECK(row_source[i] == want_row_source[i], "row %d source %d", i, row_source[i]);
  CHECK(errors == 0, "error count %d", errors);
  for (int i = 0; i < T * H; ++i) CHECK(fabsf(out[i] - want[i]) < 1e-6f, "combined %d: %f vs %f", i, out[i], want[i]);
  void *all[] = {d_ids, d_counts, d_offsets, d_row_source, d_pair_row, d_errors, d_ws, d_x, d_rows, d_w, d_out};
  for (size_t i = 0; i < sizeof all / sizeof all[0]; ++i) cudaFree(all[i]);
}

int main(void) {
  cpu_side();
  int devices = 0;
  if (cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0) {
    gpu_side();
    gpu_permutation();
  } else {
    /* No GPU: a fully valid call must fail cleanly with a status, not crash. */
    moek_route_args a = topk_args(4, 8, 2);
    a.logits = (const void *)0x1000;
    a.topk_ids = (int32_t *)0x2000;
    a.topk_weights = (float *)0x3000;
    moek_status s = moek_route(&a, NULL);
    CHECK(s == MOEK_ERROR_CUDA || s == MOEK_ERROR_NO_CUDA_KERNELS, "no-GPU call returned %d", (int)s);
    printf("no GPU visible: the GPU part of the C API test was skipped (%s)\n", moek_status_string(s));
  }
  printf("c_api_test: %d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
