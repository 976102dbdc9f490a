/*
 * moe_kernels.h: the C interface of moe-kernels, CUDA kernels for Mixture-of-Experts layers.
 *
 * Conventions, for every function below:
 * - Calls that touch the GPU are stream-ordered: they enqueue work on `stream` and return without
 *   waiting for it. They never allocate device memory and never synchronise with the host, so they
 *   can be captured into a CUDA graph. All memory is owned by the caller.
 * - Every function returns a moek_status. Arguments are checked before anything is enqueued: on a
 *   status other than MOEK_SUCCESS nothing was written, and moek_last_error_message() names the
 *   offending argument (per calling thread).
 * - Pointers named "device" point to device memory of the stream's device.
 * - The library builds without the CUDA kernels on machines with no CUDA compiler; every GPU call then
 *   returns MOEK_ERROR_NO_CUDA_KERNELS (argument checks and size queries still work).
 *
 * The header needs no CUDA header: it declares cudaStream_t the way CUDA's driver_types.h does.
 */
#ifndef MOE_KERNELS_H
#define MOE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOEK_VERSION_MAJOR 0
#define MOEK_VERSION_MINOR 1
#define MOEK_VERSION_PATCH 0

#ifndef __DRIVER_TYPES_H__
/* Identical to CUDA's own declaration, so including cuda_runtime.h before or after is fine. */
typedef struct CUstream_st *cudaStream_t;
#endif

/* Result of every call. */
typedef enum moek_status {
  MOEK_SUCCESS = 0,
  MOEK_ERROR_NULL_POINTER = 1,          /* a required pointer is NULL */
  MOEK_ERROR_INVALID_NUM_TOKENS = 2,    /* num_tokens negative or too large */
  MOEK_ERROR_INVALID_NUM_EXPERTS = 3,   /* num_experts outside 1..MOEK_ROUTE_MAX_EXPERTS */
  MOEK_ERROR_INVALID_K = 4,             /* k = 0, k > num_experts, k > MOEK_ROUTE_MAX_K, or k not
                                           reachable under the mode's group constraints */
  MOEK_ERROR_INVALID_GROUPS = 5,        /* num_groups does not divide num_experts (or k), or is out of range */
  MOEK_ERROR_INVALID_TOPK_GROUPS = 6,   /* topk_groups = 0 or topk_groups > num_groups */
  MOEK_ERROR_INVALID_CAPACITY = 7,      /* capacity 0 where the mode needs one */
  MOEK_ERROR_INVALID_DTYPE = 8,         /* a dtype this operation does not take */
  MOEK_ERROR_INVALID_ENUM = 9,          /* a mode or score function value that does not exist */
  MOEK_ERROR_MISALIGNED = 10,           /* a pointer not aligned to its element type */
  MOEK_ERROR_WORKSPACE_TOO_SMALL = 11,  /* workspace_bytes below the size query's answer */
  MOEK_ERROR_BUFFER_TOO_SMALL = 12,     /* a buffer shorter than the shape needs (Rust API) */
  MOEK_ERROR_INVALID_VALUE = 13,        /* a scalar argument that is not finite or out of range */
  MOEK_ERROR_NO_CUDA_KERNELS = 14,      /* the library was built without its CUDA kernels */
  MOEK_ERROR_CUDA = 15,                 /* a CUDA call failed while enqueueing the work */
  MOEK_ERROR_INVALID_RANKS = 16         /* num_ranks or rank out of range, or num_ranks not dividing
                                           num_experts (expert parallelism) */
} moek_status;

/* Element types of tensors. */
typedef enum moek_dtype {
  MOEK_DTYPE_F32 = 0,
  MOEK_DTYPE_BF16 = 1,
  MOEK_DTYPE_F16 = 2
} moek_dtype;

/* A static, human-readable description of a status. Never NULL. */
const char *moek_status_string(moek_status status);

/* The message of the last failed call on the calling thread ("" if none): which argument was wrong
 * and why. Valid until the next moe_kernels call on this thread. Never NULL. */
const char *moek_last_error_message(void);

/* The library's version as MAJOR * 10000 + MINOR * 100 + PATCH; compare with the MOEK_VERSION_*
 * macros of the header you compiled against. */
uint32_t moek_version(void);

/* ------------------------------------------------------------------------------------------------
 * Routing: scores, then top-k expert selection per token.
 *
 * For each token t (a row of `logits`, num_experts wide):
 *   score[e]  = softmax over the row (MOEK_SCORE_SOFTMAX: exp(x - max) times the reciprocal of the
 *               row's sum) or sigmoid(logit) (MOEK_SCORE_SIGMOID), computed in fp32;
 *   key[e]    = score[e] + bias[e] when `bias` is given (DeepSeek-V3's correction bias), else score[e].
 *               Keys decide the selection only; weights come from the unbiased scores.
 *   selection = by mode (below), ties broken towards the lower expert index. Without a bias, outside
 *               the group-limited mode, the kernels rank by the logit, which orders as the score does
 *               except where fp32 rounding makes two scores equal: the larger logit then wins;
 *   weight    = score of the selected expert, divided by the sum of the selected scores when
 *               `renormalize` is set, then multiplied by `scale`.
 * topk_ids[t][j] / topk_weights[t][j] hold the k selections in descending key order (ties: lower id).
 *
 * Modes:
 *   MOEK_ROUTE_TOPK           the k best keys of the row.
 *   MOEK_ROUTE_GROUP_LIMITED  DeepSeek-V3: the experts form num_groups equal contiguous groups; a group's
 *                             rank is the sum of its two best keys (its best key for groups of one);
 *                             the topk_groups best groups are kept and the k best keys among their
 *                             experts are chosen.
 *   MOEK_ROUTE_GROUPED        MoGE (Pangu Pro MoE): num_groups equal contiguous groups, k / num_groups
 *                             best keys chosen inside every group.
 *   MOEK_ROUTE_SWITCH         Switch Transformer: top-1 with an expert capacity (k must be 1).
 *
 * Capacity: with capacity > 0 (any mode; required by MOEK_ROUTE_SWITCH), each expert keeps at most
 * `capacity` of the (token, slot) pairs routed to it, in order of token index then slot: the lowest
 * token index wins, so the result is deterministic. A dropped pair gets id MOEK_DROPPED_ID and weight
 * 0 (other weights of the token are left as computed), and the number of dropped pairs is written to
 * *dropped_count (device). Capacity needs a workspace: see moek_route_workspace_size.
 * ---------------------------------------------------------------------------------------------- */

#define MOEK_ROUTE_MAX_EXPERTS 1024
#define MOEK_ROUTE_MAX_K 32
#define MOEK_ROUTE_MAX_GROUPS 64
/* topk_ids value of a (token, slot) pair dropped by the capacity limit. */
#define MOEK_DROPPED_ID (-1)

typedef enum moek_route_mode {
  MOEK_ROUTE_TOPK = 0,
  MOEK_ROUTE_GROUP_LIMITED = 1,
  MOEK_ROUTE_GROUPED = 2,
  MOEK_ROUTE_SWITCH = 3
} moek_route_mode;

typedef enum moek_score_function {
  MOEK_SCORE_SOFTMAX = 0,
  MOEK_SCORE_SIGMOID = 1
} moek_score_function;

typedef struct moek_route_args {
  moek_route_mode mode;
  moek_score_function score_function;
  moek_dtype logits_dtype;   /* MOEK_DTYPE_F32 or MOEK_DTYPE_BF16 */
  int64_t num_tokens;        /* T >= 0 */
  int32_t num_experts;       /* E, 1..MOEK_ROUTE_MAX_EXPERTS, any value */
  int32_t k;                 /* 1..min(E, MOEK_ROUTE_MAX_K) */
  int32_t num_groups;        /* GROUP_LIMITED and GROUPED: groups (divides E, <= MOEK_ROUTE_MAX_GROUPS);
                                ignored by the other modes */
  int32_t topk_groups;       /* GROUP_LIMITED: groups kept, 1..num_groups; ignored otherwise */
  int32_t capacity;          /* 0: no limit; > 0: pairs kept per expert (required by SWITCH) */
  int32_t renormalize;       /* nonzero: weights divided by the sum of the selected scores */
  float scale;               /* finite multiplier of the weights (1.0 for none) */
  const void *logits;        /* device [T, E] of logits_dtype, row-major, element-aligned */
  const float *bias;         /* device [E] or NULL */
  int32_t *topk_ids;         /* device [T, k], written */
  float *topk_weights;       /* device [T, k], written */
  int32_t *dropped_count;    /* device, one int32, written when capacity > 0; may be NULL otherwise */
  void *workspace;           /* device, workspace_bytes long (may be NULL when the query says 0) */
  size_t workspace_bytes;
} moek_route_args;

/* Bytes of device workspace moek_route needs for these arguments (0 without capacity). Reads only the
 * shape fields (mode, dtype, num_tokens, num_experts, k, groups, capacity); pointers may be NULL. */
moek_status moek_route_workspace_size(const moek_route_args *args, size_t *bytes);

/* Enqueues the routing of args->num_tokens rows on `stream`. Reads logits and bias; writes topk_ids,
 * topk_weights, dropped_count and the workspace. T = 0 is valid and writes only dropped_count. */
moek_status moek_route(const moek_route_args *args, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------
 * Permutation: the plan (which row of the expert-grouped layout each (token, slot) pair takes), permute
 * (gather token rows into that layout) and combine (weighted sum of the expert outputs back per token).
 *
 * A pair p = t * k + s is token t's slot s. The plan groups kept pairs by expert, experts in index
 * order, pairs inside an expert in increasing p (so the plan is deterministic); each expert's block of
 * rows starts at a multiple of row_align (padding rows in between hold no pair). A pair is not kept
 * when its id is MOEK_DROPPED_ID, when its expert already has `capacity` pairs (capacity > 0), or when
 * its id is out of range: the plan counts those in *error_count and never writes out of bounds.
 * ---------------------------------------------------------------------------------------------- */

#define MOEK_PLAN_MAX_EXPERTS 8192
#define MOEK_PLAN_MAX_K 64

typedef struct moek_plan_args {
  int64_t num_tokens;        /* T >= 0 */
  int32_t k;                 /* slots per token, 1..MOEK_PLAN_MAX_K */
  int32_t num_experts;       /* E, 1..MOEK_PLAN_MAX_EXPERTS */
  int32_t capacity;          /* 0: no limit; > 0: pairs kept per expert, lowest p first */
  int32_t row_align;         /* >= 1: every expert's block starts at a multiple of it (GEMM tiles) */
  int32_t num_ranks;         /* 0 or 1: one GPU; R > 1 divides E: experts [r*E/R, (r+1)*E/R) live on rank r */
  const int32_t *topk_ids;   /* device [T, k] */
  int32_t *expert_counts;    /* device [E], written: pairs kept per expert */
  int32_t *expert_offsets;   /* device [E + 1], written: first row of each expert's block; [E] = rows in use */
  int32_t *row_source;       /* device [max_rows], written up to expert_offsets[E]: the pair of each row,
                                -1 for padding rows */
  int32_t *pair_row;         /* device [T, k], written: the row of each pair, -1 if not kept */
  int32_t *rank_counts;      /* device [R] or NULL (R > 1 only): pairs kept per rank */
  int32_t *rank_offsets;     /* device [R + 1] or NULL (R > 1 only): first row of each rank's experts */
  int32_t *error_count;      /* device, one int32, written: pairs whose id was out of range */
  void *workspace;           /* device, workspace_bytes long */
  size_t workspace_bytes;
} moek_plan_args;

/* Rows the layout can need for these arguments: min(T*k, E*capacity) + E*(row_align - 1). Size
 * row_source and the permuted buffers with it. Reads only the shape fields. */
moek_status moek_plan_max_rows(const moek_plan_args *args, int64_t *rows);

/* Bytes of device workspace moek_plan needs. Reads only the shape fields. */
moek_status moek_plan_workspace_size(const moek_plan_args *args, size_t *bytes);

/* Enqueues the plan. Reads topk_ids; writes every output named above and the workspace. */
moek_status moek_plan(const moek_plan_args *args, cudaStream_t stream);

typedef struct moek_permute_args {
  moek_dtype dtype;          /* of x and out: f32, bf16 or f16 */
  int64_t num_tokens;        /* T */
  int32_t k;
  int32_t num_experts;       /* E of the plan */
  int64_t hidden;            /* H, a multiple of 8 */
  int64_t max_rows;          /* rows of out (at least moek_plan_max_rows) */
  const void *x;             /* device [T, H], 16-byte aligned */
  const int32_t *row_source; /* device [max_rows], from moek_plan (read for zero_padding only) */
  const int32_t *pair_row;   /* device [T, k], from moek_plan: where each token row is written */
  const int32_t *expert_offsets; /* device [E + 1], from moek_plan (rows in use: expert_offsets[E]) */
  const float *pair_scale;   /* device [T, k] or NULL: row of pair p multiplied by pair_scale[p] */
  int32_t zero_padding;      /* nonzero: padding rows written as zeros (else left as they are) */
  void *out;                 /* device [max_rows, H], 16-byte aligned; rows past expert_offsets[E] untouched */
} moek_permute_args;

/* Enqueues out[pair_row[p]] = x[p / k] (times pair_scale[p]) for every kept pair p, and zeros for the
 * padding rows when zero_padding. Each token row is read once and written k times. */
moek_status moek_permute(const moek_permute_args *args, cudaStream_t stream);

typedef struct moek_combine_args {
  moek_dtype dtype;          /* of y, residual and out: f32, bf16 or f16 */
  int64_t num_tokens;        /* T */
  int32_t k;
  int64_t hidden;            /* H, a multiple of 8 */
  int64_t max_rows;          /* rows of y */
  const void *y;             /* device [max_rows, H], 16-byte aligned: the expert outputs per row */
  const int32_t *pair_row;   /* device [T, k], from moek_plan */
  const float *weights;      /* device [T, k] or NULL (weight 1) */
  const void *residual;      /* device [T, H] or NULL; may be the same buffer as out */
  void *out;                 /* device [T, H], 16-byte aligned, written */
} moek_combine_args;

/* Enqueues out[t] = residual[t] + sum over s = 0..k-1 of weights[t,s] * y[pair_row[t,s]], accumulated
 * in fp32 in that order (bit-identical from run to run); pairs with row -1 (or a row outside
 * 0..max_rows-1) add nothing. */
moek_status moek_combine(const moek_combine_args *args, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------
 * Grouped GEMM: every expert's matrix product in one launch.
 *
 * For every expert e and every row r of e:  out[r] = epilogue(a[r] . b[e]^T) * row_scale[r]
 * with a [rows, k], b [num_experts, n, k] (the nn.Linear weight layout) and fp32 accumulation. Which rows
 * belong to which expert lives in device memory only (the host never reads it):
 *   MOEK_GEMM_CONTIGUOUS  expert e owns rows expert_offsets[e] .. expert_offsets[e+1] of a and out (the
 *                         layout moek_plan/moek_permute produce). Offsets are clamped to [0, max_rows]
 *                         and an expert whose offsets go backwards is empty, so corrupt offsets never
 *                         cause an access outside the buffers (which rows get computed is then
 *                         unspecified). Rows past expert_offsets[num_experts] (and rows no expert owns)
 *                         are left untouched.
 *   MOEK_GEMM_MASKED      a is [num_experts, capacity, k] and out [num_experts, capacity, n_out]: expert e
 *                         owns rows e*capacity .. e*capacity + expert_counts[e] (counts clamped to
 *                         [0, capacity]); the rest of each expert's rows is left untouched. The layout of
 *                         a graph-captured decode step or a multi-GPU receive buffer.
 * Epilogues (n_out = output columns):
 *   MOEK_EPILOGUE_IDENTITY  the product, n_out = n.
 *   MOEK_EPILOGUE_SWIGLU    b holds the gate (rows 0..n/2-1) and up (rows n/2..n-1) projections
 *                           concatenated; out = silu(gate) * up, n_out = n/2 (n/2 a multiple of 8).
 *   MOEK_EPILOGUE_GELU      x * (1 + erf(x / sqrt 2)) / 2, n_out = n.
 *   MOEK_EPILOGUE_RELU      max(x, 0), n_out = n.
 * row_scale (optional) multiplies each output row after the activation (a routing weight).
 * The result is bit-identical from run to run (no atomics).
 *
 * Split-K. With few output tiles (decode: a few rows on a few experts), too few CTAs would stream the
 * weights to reach the memory bandwidth, so the K dimension is cut into S slices computed by different
 * CTAs; each writes fp32 partial products to the workspace ([S, rows, n] floats, rows = max_rows or
 * num_experts * capacity) and a second kernel sums them in slice order 0..S-1, then applies the
 * epilogue. S comes from the sizes only (never from the counts on the device; not from the GPU model):
 * split_k = 0 lets the library choose (S = 1 when the tiles are many), and the size query says how
 * many bytes that choice needs. Without enough workspace (workspace_bytes below the query's answer) the
 * automatic choice falls back to no split. The result is bit-identical from run to run for the same
 * arguments and workspace size; a different S (another workspace size or split_k) sums in another order
 * and may differ in the last bits. The workspace needs no initialisation and holds nothing afterwards.
 * The sm_90a kernel (MOEK_GEMM_TILE_HOPPER, MOEK_GEMM_TILE_HOPPER_64) never splits K: when the tile
 * is or resolves to either, split_k is ignored and the workspace left untouched. The size query answers
 * 0 for those tiles (given, or from MOEK_GEMM_TILE=hopper or hopper64); for AUTO it does not ask the
 * device and answers as for the portable kernel, which is enough whichever kernel the call then runs.
 *
 * Tuning overrides, read once per process from the environment (for sweeps; they change results only
 * within the tolerance of a different summation order):
 * MOEK_GEMM_TILE=auto|small|medium|large|hopper|hopper64 replaces MOEK_GEMM_TILE_AUTO (so do two
 * candidate decode tiles: small6, SMALL with 6 pipeline stages,
 * and medium64, 64 x 128 with 64-wide K steps; auto or unset keeps the automatic choice),
 * MOEK_GEMM_HOPPER=0 keeps the automatic choice off the sm_90a kernel (a given or overridden HOPPER
 * or HOPPER_64 tile still runs it), MOEK_GEMM_SPLIT_K=n (1..MOEK_GEMM_MAX_SPLIT_K) replaces split_k = 0 (it still
 * needs the workspace the size query then reports), MOEK_GEMM_SPLIT_TARGET=ctas replaces the number of
 * CTAs the automatic choice aims at (768, counted as if all rows sat on one expert, the fewest tiles the
 * sizes allow; the spread case is kept within 4 times that).
 * ---------------------------------------------------------------------------------------------- */

#define MOEK_GEMM_MAX_EXPERTS 8192
/* The largest n (columns of the product). */
#define MOEK_GEMM_MAX_N (1 << 21)
/* The most K slices split_k may ask for. */
#define MOEK_GEMM_MAX_SPLIT_K 64

typedef enum moek_gemm_layout {
  MOEK_GEMM_CONTIGUOUS = 0,
  MOEK_GEMM_MASKED = 1
} moek_gemm_layout;

typedef enum moek_gemm_epilogue {
  MOEK_EPILOGUE_IDENTITY = 0,
  MOEK_EPILOGUE_SWIGLU = 1,
  MOEK_EPILOGUE_GELU = 2,
  MOEK_EPILOGUE_RELU = 3
} moek_gemm_epilogue;

/* Output rows per CTA of the tensor-core kernel (mma.sync, sm_80 and later). AUTO picks by the average
 * rows per expert the sizes allow (max_rows / num_experts, or capacity): SMALL (32 x 64 tiles, weights
 * streamed once per 32 rows of an expert: decode) up to 32, MEDIUM (64 x 128) up to 64, LARGE
 * (128 x 128) above; where the sm_90a kernel is available, HOPPER_64 from 33 to 127 and HOPPER from
 * 128 instead. The others force a shape (tests, tuning). HOPPER is the sm_90a kernel (TMA, wgmma;
 * 128 x 256 tiles, persistent), HOPPER_64 the same kernel with 64 x 256 tiles: they run only on a
 * compute capability 9.0 device with a build that holds sm_90a code (see
 * moek_grouped_gemm_hopper_available); forced elsewhere, moek_grouped_gemm returns MOEK_ERROR_CUDA.
 * They do not split K (see Split-K above). The environment variable MOEK_GEMM_HOPPER=0 keeps AUTO off
 * them. */
typedef enum moek_gemm_tile {
  MOEK_GEMM_TILE_AUTO = 0,
  MOEK_GEMM_TILE_SMALL = 1,
  MOEK_GEMM_TILE_MEDIUM = 2,
  MOEK_GEMM_TILE_LARGE = 3,
  MOEK_GEMM_TILE_HOPPER = 4,
  MOEK_GEMM_TILE_HOPPER_64 = 5
} moek_gemm_tile;

typedef struct moek_grouped_gemm_args {
  moek_gemm_layout layout;
  moek_dtype dtype;          /* of a and b: MOEK_DTYPE_BF16 or MOEK_DTYPE_F16 */
  moek_dtype out_dtype;      /* of out: dtype or MOEK_DTYPE_F32 */
  moek_gemm_epilogue epilogue;
  moek_gemm_tile tile;       /* MOEK_GEMM_TILE_AUTO unless forcing a shape */
  int32_t num_experts;       /* E, 1..MOEK_GEMM_MAX_EXPERTS */
  int64_t n;                 /* columns of the product, a multiple of 8 (of 16 for SWIGLU), <= MOEK_GEMM_MAX_N */
  int64_t k;                 /* the reduced dimension, a multiple of 8 */
  int64_t max_rows;          /* CONTIGUOUS: rows of a, out and row_scale (0..2^31-1); ignored when MASKED */
  int64_t capacity;          /* MASKED: rows per expert (E * capacity <= 2^31-1); ignored when CONTIGUOUS */
  const void *a;             /* device [max_rows, k] or [E, capacity, k], 16-byte aligned */
  const void *b;             /* device [E, n, k], 16-byte aligned */
  const int32_t *expert_offsets; /* CONTIGUOUS: device [E + 1]; ignored when MASKED */
  const int32_t *expert_counts;  /* MASKED: device [E]; ignored when CONTIGUOUS */
  const float *row_scale;    /* device, one per row of a (max_rows or E * capacity), or NULL */
  void *out;                 /* device [max_rows, n_out] or [E, capacity, n_out] of out_dtype, 16-byte aligned */
  int32_t split_k;           /* K slices: 0 = automatic (split only with workspace, see above), 1 = never,
                                2..MOEK_GEMM_MAX_SPLIT_K = that many (workspace required) */
  void *workspace;           /* device, workspace_bytes long, 16-byte aligned; may be NULL when workspace_bytes = 0 */
  size_t workspace_bytes;
} moek_grouped_gemm_args;

/* Bytes of device workspace that split-K needs for these arguments (0: no split). Reads only the shape
 * fields (layout, dtypes, epilogue, tile, num_experts, n, k, max_rows or capacity, split_k) and the
 * MOEK_GEMM_* environment overrides; pointers may be NULL. Passing less to moek_grouped_gemm is allowed
 * with split_k = 0 (no split then) and an error (MOEK_ERROR_WORKSPACE_TOO_SMALL) with split_k >= 2. */
moek_status moek_grouped_gemm_workspace_size(const moek_grouped_gemm_args *args, size_t *bytes);

/* Enqueues the grouped GEMM. Reads a, b, the offsets or counts and row_scale; writes only the rows of
 * out that experts own, and the workspace when it splits K. */
moek_status moek_grouped_gemm(const moek_grouped_gemm_args *args, cudaStream_t stream);

/* 1 when MOEK_GEMM_TILE_HOPPER and MOEK_GEMM_TILE_HOPPER_64 can run num_experts experts on the current
 * device (the same conditions for both: compute capability 9.0, sm_90a code in this build, shared
 * memory for the expert table), else 0 (also without CUDA). */
int moek_grouped_gemm_hopper_available(int32_t num_experts);

/* ------------------------------------------------------------------------------------------------
 * A whole MoE layer, composed: route the logits (or take the caller's top-k), plan, permute the token
 * rows, gate|up projection with the activation, down projection, the shared experts if any, and the
 * fixed-order combine weighted by the routing weights:
 *   out[t] = shared(x[t]) + sum over token t's experts e of weight(t, e) * W_down[e] . act(W_gate_up[e] . x[t])
 * with shared(x) = W_shared_down . act(W_shared_gate_up . x) (0 without shared experts). Several shared
 * experts of width I_s are one of width S * I_s: concatenate their gate rows, their up rows and their
 * down columns. Up to nine launches and two small memsets on `stream`, no allocation, no host
 * synchronisation: capturable in a CUDA graph. Activations and weights are bf16 (fp32 accumulation); the
 * activation, the down projection's rows and the shared experts' output are stored in bf16 between the
 * stages. Not yet: a gate on the shared experts' output (Qwen2-MoE).
 *
 * Two implementations compute the same function (they differ only in fp32 summation order):
 *   MOEK_LAYER_COMPOSED  the stages above, one launch (or two, with split-K) each.
 *   MOEK_LAYER_FUSED     route and plan, then ONE persistent kernel that gathers the token rows from x
 *                        through the plan (no permuted copy), runs gate|up with the activation, down,
 *                        and the combine, tiles waiting on device-side counters (docs/fused-layer.md).
 *                        Shared experts run as two grouped GEMMs before it (their output is its
 *                        residual). Deterministic (fixed summation order, no float atomics); no
 *                        faster non-deterministic mode yet.
 *   MOEK_LAYER_AUTO      the library chooses (now: COMPOSED); the environment variable
 *                        MOEK_LAYER_IMPL=auto|composed|fused, read once per process, replaces AUTO.
 * ---------------------------------------------------------------------------------------------- */

typedef enum moek_layer_impl {
  MOEK_LAYER_AUTO = 0,
  MOEK_LAYER_COMPOSED = 1,
  MOEK_LAYER_FUSED = 2
} moek_layer_impl;

typedef struct moek_layer_args {
  moek_route_args routing;   /* mode, score_function, logits_dtype, num_experts, k, num_groups,
                                topk_groups, capacity, renormalize, scale; its num_tokens, pointers and
                                workspace fields are ignored (the layer fills them). With topk_ids
                                only num_experts and k are read. */
  int64_t num_tokens;        /* T >= 0 */
  int64_t hidden;            /* H, a multiple of 8 */
  int64_t intermediate;      /* I, a multiple of 8 */
  moek_gemm_epilogue activation; /* SWIGLU (w_gate_up [E, 2I, H], gate rows first), GELU or RELU
                                    (w_gate_up [E, I, H]) */
  const void *x;             /* device [T, H] bf16, 16-byte aligned */
  /* Routing input: exactly one of logits (the layer routes them) and topk_ids (routed by the caller). */
  const void *logits;        /* device [T, E] of routing.logits_dtype, or NULL */
  const float *bias;         /* device [E] or NULL: added to the scores for selection only (with logits) */
  const int32_t *topk_ids;   /* device [T, k] or NULL: expert ids; -1 (or any id outside 0..E-1) is a
                                dropped pair that adds nothing */
  const float *topk_weights; /* device [T, k] with topk_ids (NULL: every weight 1); must be NULL with logits */
  const void *w_gate_up;     /* device [E, 2I or I, H] bf16, 16-byte aligned */
  const void *w_down;        /* device [E, H, I] bf16, 16-byte aligned */
  int64_t shared_intermediate; /* I_s: 0 (no shared experts) or a multiple of 8 */
  const void *w_shared_gate_up; /* device [2 I_s or I_s, H] bf16, 16-byte aligned (same activation), or NULL
                                   when shared_intermediate = 0 */
  const void *w_shared_down; /* device [H, I_s] bf16, 16-byte aligned, or NULL when shared_intermediate = 0 */
  void *out;                 /* device [T, H] bf16, 16-byte aligned, written */
  void *workspace;           /* device, workspace_bytes long, 256-byte aligned */
  size_t workspace_bytes;
  moek_layer_impl implementation; /* MOEK_LAYER_AUTO (0) unless forcing one (see above) */
} moek_layer_args;

/* Bytes of device workspace moek_layer needs (routing results, the plan, the permuted, intermediate
 * and expert-output rows, the fused kernel's counters): enough for either implementation. Grows with
 * num_tokens: a workspace sized for T serves every call of at most T tokens. Reads only the shape
 * fields. */
moek_status moek_layer_workspace_size(const moek_layer_args *args, size_t *bytes);

/* Enqueues the layer. Reads x, the routing input and the weights; writes out and the workspace.
 * An implementation value outside the enum is MOEK_ERROR_INVALID_ENUM. */
moek_status moek_layer(const moek_layer_args *args, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------
 * Sub-1-bit expert weights: ternary matrices ({0, +pos[r], -neg[r]} per row) compressed with a
 * dictionary code of 16-bit codewords (the MKT1 format of moe_kernels::subbit, written by its encoder).
 *
 * A compressed buffer is checked on the host before any kernel sees it, then copied to the device as an
 * "image" the kernels read:
 *   1. moek_subbit_parse(bytes, n, &w): validates the whole buffer (header, sizes, scales, every tile
 *      offset, every codeword and every tile's decoded length) and fills w's shape and layout fields
 *      (w.image = NULL).
 *   2. moek_subbit_write_image(bytes, n, host_image, w.image_bytes): writes the image on the host: the
 *      expanded dictionary (8 bytes per codeword: nonzero and sign masks of its phrase), the row levels,
 *      the tile offsets, the codewords and restart points every 256 columns of each tile (after the
 *      codewords; included in image_bytes), each section 16-byte aligned; the image numbers the
 *      codewords by how often the buffer uses them (hottest first), so kernels can keep a prefix of the
 *      dictionary in shared memory.
 *   3. Copy host_image to device memory (16-byte aligned, e.g. cudaMalloc + cudaMemcpy) and set
 *      w.image to it. The kernels trust that the image is what step 2 wrote; they never read or write
 *      outside the image and their outputs whatever it holds, but a different image gives unspecified
 *      values.
 * The descriptor's fields are re-checked against each other on every call (a mismatch is
 * MOEK_ERROR_INVALID_VALUE naming the field), so a descriptor edited by hand is refused.
 *
 * Values: W[m][r][c] = 0, +pos[m][r] or -neg[m][r] with the levels stored in f16; the dense bf16 weight
 * is the f16 level rounded to bf16 (to nearest even), exactly what the CPU decoder gives.
 * ---------------------------------------------------------------------------------------------- */

/* Most tokens (rows of x) a plain matvec takes; grouped calls take any number of rows per expert but are
 * meant for a few (each block handles an expert's rows 8 at a time and decodes its tile again for each
 * group of 8). */
#define MOEK_SUBBIT_MAX_TOKENS 8

typedef struct moek_subbit_weights {
  int32_t matrices;          /* M >= 1 (experts) */
  int32_t rows;              /* R >= 1: output features */
  int32_t cols;              /* C >= 1: input features */
  int32_t tile_cols;         /* columns per tile (a power of two, 256..65536) */
  int32_t tiles_per_row;     /* ceil(C / tile_cols) */
  int32_t dictionary_entries;/* D, 3..65536 */
  int64_t codes;             /* 16-bit codewords in all */
  size_t image_bytes;        /* bytes of the device image */
  size_t dictionary_at;      /* byte offsets of the image's sections: dictionary (u64 [D]) */
  size_t scales_at;          /* levels: f16 [M, R, 2], positive then negative magnitude */
  size_t offsets_at;         /* tile offsets: u32 [M * R * tiles_per_row + 1] */
  size_t codes_at;           /* codewords: u16 [codes] */
  const void *image;         /* device, 16-byte aligned: the copy of moek_subbit_write_image's output */
} moek_subbit_weights;

/* Validates a compressed buffer (host memory, num_bytes long) and fills *weights (image = NULL). A
 * corrupt buffer gives MOEK_ERROR_INVALID_VALUE and a message saying what is wrong; never reads past
 * num_bytes. Host only, no CUDA. */
moek_status moek_subbit_parse(const void *bytes, size_t num_bytes, moek_subbit_weights *weights);

/* Validates the buffer again and writes its device image to host memory `image` (image_bytes long, at
 * least moek_subbit_parse's weights.image_bytes). Host only, no CUDA. */
moek_status moek_subbit_write_image(const void *bytes, size_t num_bytes, void *image, size_t image_bytes);

typedef struct moek_subbit_decode_args {
  moek_subbit_weights weights;
  void *out;                 /* device [M, R, C] bf16, 2-byte aligned, written */
} moek_subbit_decode_args;

/* Enqueues the lossless decode of every matrix to dense bf16. */
moek_status moek_subbit_decode(const moek_subbit_decode_args *args, cudaStream_t stream);

/* Fused decode + matrix-vector product, y[t][r] = sum over c of x[t][c] * W[m][r][c], fp32 accumulation,
 * bf16 in and out; the dense weight never reaches global memory.
 *   expert_offsets == NULL: one matrix `matrix` (0..M-1) and num_tokens (1..MOEK_SUBBIT_MAX_TOKENS)
 *                           rows of x and y.
 *   expert_offsets != NULL: grouped (the layout moek_plan/moek_permute produce): expert m owns rows
 *                           expert_offsets[m] .. expert_offsets[m+1] of x and y (device [M + 1],
 *                           clamped to [0, num_tokens]; an expert whose offsets go backwards is empty).
 *                           num_tokens (>= 0) is the rows of x and y; `matrix` is ignored. Experts
 *                           without rows read none of their weights. Rows outside expert_offsets[0] ..
 *                           expert_offsets[M] are untouched (offsets that go backwards never cause an
 *                           access outside the buffers; which rows get computed is then unspecified).
 * With tiles_per_row > 1 each tile's partial sums go to the workspace (fp32) and a second kernel adds
 * them in tile order, so the result is bit-identical from run to run. */
typedef struct moek_subbit_matvec_args {
  moek_subbit_weights weights;
  int32_t matrix;            /* the matrix of a plain call; ignored when grouped */
  int64_t num_tokens;        /* rows of x and y */
  const int32_t *expert_offsets; /* device [M + 1] or NULL (plain call) */
  const void *x;             /* device [num_tokens, C] bf16, 2-byte aligned */
  void *y;                   /* device [num_tokens, R] bf16, 2-byte aligned, written */
  void *workspace;           /* device, workspace_bytes long, 16-byte aligned; NULL when the query says 0 */
  size_t workspace_bytes;
} moek_subbit_matvec_args;

/* Bytes of workspace moek_subbit_matvec needs: 4 * tiles_per_row * num_tokens * R when tiles_per_row
 * > 1, else 0. Reads only the weights' shape fields and num_tokens. */
moek_status moek_subbit_matvec_workspace_size(const moek_subbit_matvec_args *args, size_t *bytes);

/* Enqueues the fused decode + matvec. Reads the image, x and the offsets; writes y and the workspace. */
moek_status moek_subbit_matvec(const moek_subbit_matvec_args *args, cudaStream_t stream);

/* Fused decode + grouped GEMM, for tens of rows per expert (prefill, batched decode): for every expert m
 * and every row r it owns,
 *   y[r][n] = row_scale[r] * sum over c of x[r][c] * Wb[m][n][c]      (n = 0..R-1, c = 0..C-1)
 * with Wb the dense bf16 weights moek_subbit_decode writes (the f16 levels rounded to bf16, to nearest
 * even), bf16 x and y, fp32 accumulation on the tensor cores (mma.sync, sm_80 and later); the dense weights
 * never reach global memory. Expert m owns rows expert_offsets[m] .. expert_offsets[m+1] of x, y and
 * row_scale (device [M + 1], clamped to [0, num_rows]; an expert whose offsets go backwards is empty):
 * the layout moek_plan/moek_permute produce and moek_grouped_gemm's MOEK_GEMM_CONTIGUOUS. Experts without
 * rows read none of their weights; rows outside expert_offsets[0] .. expert_offsets[M] are untouched
 * (offsets that go backwards never cause an access outside the buffers; which rows get computed is then
 * unspecified). Any number of rows per expert; each block takes 64 rows of one expert, so this is meant
 * for about 16 rows per expert and more (fewer: moek_subbit_matvec).
 *
 * Split-K: with few output tiles, K is cut at the image's tile boundaries into S slices (at most
 * tiles_per_row) computed by different blocks; each writes fp32 partial products to the workspace
 * ([S, num_rows, R] floats) and a second kernel adds them in slice order 0..S-1, then applies row_scale,
 * so the result is bit-identical from run to run (for a given S). S comes from the sizes only:
 * split_k = 0 lets the library choose (MOEK_SUBBIT_GEMM_SPLIT_TARGET=ctas, read once per process,
 * replaces the number of blocks it aims at) and falls back to S = 1 when workspace_bytes is below the
 * size query's answer; split_k = 1 never splits; split_k >= 2 asks for that many slices (lowered to
 * tiles_per_row), with the workspace required. */
#define MOEK_SUBBIT_GEMM_MAX_SPLIT_K 64

typedef struct moek_subbit_grouped_gemm_args {
  moek_subbit_weights weights; /* M at most MOEK_GEMM_MAX_EXPERTS */
  int64_t num_rows;          /* rows of x, y and row_scale, 0..2^31-1 */
  const int32_t *expert_offsets; /* device [M + 1] */
  const void *x;             /* device [num_rows, C] bf16, 2-byte aligned (16-byte aligned rows, i.e. x
                                16-byte aligned and C a multiple of 8, take the asynchronous-copy path) */
  const float *row_scale;    /* device [num_rows] or NULL (scale 1) */
  void *y;                   /* device [num_rows, R] bf16, 2-byte aligned, written */
  int32_t split_k;           /* K slices: 0 automatic, 1 never, 2..MOEK_SUBBIT_GEMM_MAX_SPLIT_K that many
                                (lowered to tiles_per_row; workspace required) */
  void *workspace;           /* device, workspace_bytes long, 16-byte aligned; may be NULL when the query
                                says 0 */
  size_t workspace_bytes;
} moek_subbit_grouped_gemm_args;

/* Bytes of workspace moek_subbit_grouped_gemm needs for these arguments: 4 * S * num_rows * R for the S
 * slices it would cut K into (0 when S = 1). Reads only the weights' shape fields, num_rows, split_k and
 * the MOEK_SUBBIT_GEMM_SPLIT_TARGET override; pointers may be NULL. */
moek_status moek_subbit_grouped_gemm_workspace_size(const moek_subbit_grouped_gemm_args *args, size_t *bytes);

/* Enqueues the fused decode + grouped GEMM. Reads the image, x, the offsets and row_scale; writes the
 * rows of y that experts own, and the workspace when it splits K. num_rows = 0 enqueues nothing. */
moek_status moek_subbit_grouped_gemm(const moek_subbit_grouped_gemm_args *args, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------
 * Expert parallelism across the GPUs of one host: dispatch (every token's row to the rank that owns
 * each of its experts) and combine (the expert outputs back to their token's rank, weighted-summed).
 *
 * Ranks 0..R-1 each own E/R consecutive experts: rank r owns experts r*E/R .. (r+1)*E/R - 1 ("local
 * experts" 0..E/R-1 there). Every rank holds one symmetric buffer of moek_ep_layout's symmetric_bytes
 * that every other rank can address (peer access inside one process, or CUDA IPC handles opened in
 * each process): `peers[q]` is rank q's buffer as this rank's device addresses it, peers[rank] this
 * rank's own. The kernels store rows straight into the peers' buffers over NVLink and signal with
 * flags (release/acquire at system scope); no host synchronisation, so both calls can be captured
 * into a CUDA graph.
 *
 * Contract, per call:
 * - Every rank calls moek_ep_dispatch, then (after its expert computation, on the same stream)
 *   moek_ep_combine, the same number of times and in the same order as every other rank; a call
 *   waits on the device for its peers' matching call. All ranks' work must be able to run at once
 *   (one stream per GPU; do not serialise the ranks behind one host thread's synchronisation).
 * - The symmetric buffer and the workspace of every rank are zero-filled once before the first call,
 *   and every rank's zero fill completes before any rank's first dispatch.
 * - Received rows of dispatch: in the symmetric buffer at received_offset, [max_received_rows, H],
 *   grouped by local expert (experts in order; inside an expert, source ranks in order; inside a
 *   source, its pairs in increasing p = t * k + s): local expert j owns rows
 *   received_expert_offsets[j] .. received_expert_offsets[j+1] - 1 (the contiguous layout of the
 *   grouped GEMM). They stay valid until this rank's next dispatch.
 * - Masked layout (config.capacity > 0): the received rows are [E/R, capacity, H], local expert j at
 *   rows j*capacity .. j*capacity + count_j - 1 in the same order (sources in rank order, then pairs),
 *   count_j = min(rows sent to j, capacity) written to received_expert_offsets[j] (the grouped GEMM's
 *   MOEK_GEMM_MASKED counts); a pair beyond its expert's capacity is dropped: not sent, and it adds
 *   nothing in combine. Fixed shapes for a captured graph whatever the routing.
 * - A pair whose id is MOEK_DROPPED_ID or outside 0..E-1 is not sent and adds nothing in combine.
 * - Combine reads the expert outputs for the received rows (same layout, H wide; may be the
 *   received rows themselves, overwritten in place) and writes out[t] = residual[t] + sum over the
 *   ranks o holding some of t's experts of S(t, o), where S(t, o) = sum over t's slots s on o of
 *   topk_weights[t,s] * output of pair (t,s), accumulated in fp32 in slot order at o and rounded to the
 *   dtype there (one row per token and owner crosses NVLink, not one per pair); the S(t, o) are added
 *   in fp32 in the slot order of each owner's first slot. Bit-identical from run to run. The weights
 *   are the dispatch's topk_weights.
 *
 * One process per GPU (CUDA IPC), from C; the Rust API's moe_kernels::ep::IpcRank does the same:
 * 1. Each process: cudaSetDevice(its GPU); moek_ep_layout_query; cudaMalloc the symmetric buffer (a
 *    plain allocation: IPC handles do not cover cudaMallocAsync's pool) and the workspace; cudaMemset
 *    both to 0; cudaDeviceSynchronize (the fill must be complete before the handle is published).
 * 2. cudaIpcGetMemHandle(&handle, symmetric) gives 64 plain bytes; send them to every other process
 *    over the caller's own channel (socket, shared file, the framework's all-gather).
 * 3. For every other rank q: cudaIpcOpenMemHandle(&peers[q], handle_q,
 *    cudaIpcMemLazyEnablePeerAccess); peers[rank] = the process's own buffer (a process cannot open
 *    its own handle). Holding every rank's handle implies every rank's zero fill completed, which is
 *    the barrier the first dispatch needs.
 * 4. Dispatch / combine as above, every rank the same calls in the same order.
 * 5. Teardown: cudaStreamSynchronize, cudaIpcCloseMemHandle(peers[q]) for q != rank, a barrier over
 *    the caller's channel, then cudaFree (no buffer is freed while another process has it open).
 * The GPUs must reach each other (NVLink or PCIe P2P: cudaDeviceCanAccessPeer).
 * ---------------------------------------------------------------------------------------------- */

#define MOEK_EP_MAX_RANKS 64

/* The shape every rank agrees on. */
typedef struct moek_ep_config {
  int32_t num_ranks;         /* R, 1..MOEK_EP_MAX_RANKS, divides num_experts */
  int32_t rank;              /* this rank, 0..R-1 (the size queries ignore it) */
  int32_t num_experts;       /* E, 1..MOEK_PLAN_MAX_EXPERTS */
  int32_t k;                 /* slots per token, 1..MOEK_PLAN_MAX_K */
  int64_t hidden;            /* H: elements per row, a multiple of 8 */
  int64_t max_tokens;        /* most tokens any rank passes to one call, >= 0 */
  moek_dtype dtype;          /* of the rows: f32, bf16 or f16 */
  int64_t capacity;          /* 0: the contiguous layout; > 0: the masked layout, rows per local expert */
} moek_ep_config;

/* Sizes and where things live, the same on every rank. */
typedef struct moek_ep_layout {
  size_t symmetric_bytes;    /* of each rank's symmetric buffer (256-byte aligned) */
  size_t received_offset;    /* byte offset of the received rows in the symmetric buffer */
  int64_t max_received_rows; /* rows a rank can receive: R * max_tokens * k (every pair to its experts),
                                masked: E/R * capacity */
  size_t workspace_bytes;    /* of each rank's (local, not shared) workspace, 256-byte aligned */
} moek_ep_layout;

/* Checks the configuration (every field but rank) and writes the layout. */
moek_status moek_ep_layout_query(const moek_ep_config *config, moek_ep_layout *layout);

/* What both calls of one rank take. */
typedef struct moek_ep_group {
  moek_ep_config config;
  void *const *peers;        /* host array [R]: every rank's symmetric buffer, as this rank addresses it;
                                each 256-byte aligned and at least symmetric_bytes long */
  size_t symmetric_bytes;    /* the size of every rank's symmetric buffer (checked against the layout) */
  void *workspace;           /* device, this rank's, zero-filled once before the first call */
  size_t workspace_bytes;
} moek_ep_group;

typedef struct moek_ep_dispatch_args {
  moek_ep_group group;
  int64_t num_tokens;        /* T of this rank, 0..max_tokens (ranks may differ) */
  const void *x;             /* device [T, H], 16-byte aligned */
  const int32_t *topk_ids;   /* device [T, k], global expert ids */
  const float *topk_weights; /* device [T, k] or NULL (weight 1): the routing weights combine applies; they
                                travel with the rows, so the owners can sum each token's outputs */
  int32_t *received_expert_offsets; /* device [E/R + 1], written: the received rows' expert offsets
                                (masked layout: entry j the rows local expert j kept, the last their sum) */
} moek_ep_dispatch_args;

/* Enqueues the dispatch: this rank's plan, the exchange of per-expert counts with every rank, the row
 * stores into the owners' buffers (with the routing weights), and the wait for every rank's rows. */
moek_status moek_ep_dispatch(const moek_ep_dispatch_args *args, cudaStream_t stream);

typedef struct moek_ep_combine_args {
  moek_ep_group group;
  int64_t num_tokens;        /* T of this rank's matching dispatch */
  const void *expert_out;    /* device [received rows, H], 16-byte aligned: the output for received row i
                                (may point at the received rows in the symmetric buffer) */
  const void *residual;      /* device [T, H] or NULL; may be the same buffer as out */
  void *out;                 /* device [T, H], 16-byte aligned, written */
} moek_ep_combine_args;

/* Enqueues the combine: each owner sums the outputs of a token's rows there (weighted by the dispatch's
 * topk_weights) and stores the sum into the token's rank's buffer; after every rank's, each token's
 * sums are added up in a fixed order. */
moek_status moek_ep_combine(const moek_ep_combine_args *args, cudaStream_t stream);

/* ------------------------------------------------------------------------------------------------
 * Low-dimension expert parallelism (BigMac, Jin et al., AAAI 2025: descend, communicate, communicate,
 * ascend): the rows cross NVLink at a projected width r instead of the model width H. Composed from the
 * calls above, each enqueued on the caller's stream:
 *   moek_ep_low_dim_dispatch: the descend projection P = x . W_down^T (x [T, H], W_down [r, H]) into
 *     the low-dimension workspace, then moek_ep_dispatch of P's rows at width r;
 *   moek_ep_low_dim_combine: moek_ep_combine of the expert outputs at width r (each token's weighted
 *     sum, rounded to dtype) into the low-dimension workspace, then the ascend projection of those sums
 *     . W_up^T (W_up [H, r]) into out [T, H], then out += residual where one is given (the projection
 *     rounded to dtype first).
 * The group's config.hidden is r (a multiple of 8) and its dtype bf16 or f16; the symmetric buffer and
 * the workspace are those of moek_ep_layout_query for that configuration, and the whole contract of
 * moek_ep_dispatch / moek_ep_combine holds (every rank makes both calls, in the same order). The
 * received rows and expert_out are r wide. Each rank also passes its own low-dimension workspace
 * (moek_ep_low_dim_workspace_size), which every call overwrites: no zero fill needed, never shared.
 * Everything is checked before anything is enqueued.
 * One process driving several GPUs from one host thread: have the library's kernels loaded before the
 * first round (CUDA_MODULE_LOADING=EAGER, or one round on a group of one rank per device first): under
 * lazy loading a kernel's first launch waits for the device's running kernels, and the ascend
 * projection is enqueued behind a combine that waits for the other ranks' combines, which that host
 * thread has not enqueued yet (docs/expert-parallel.md). The Rust LowDimRank does this warm-up itself.
 * ---------------------------------------------------------------------------------------------- */

/* What both low-dimension calls of one rank take. */
typedef struct moek_ep_low_dim_group {
  moek_ep_group group;             /* config.hidden = r, the projected width; dtype bf16 or f16 */
  int64_t model_hidden;            /* H: the width of x, the residual and out, a multiple of 8 */
  void *low_dim_workspace;         /* device, 256-byte aligned, this rank's; overwritten by every call */
  size_t low_dim_workspace_bytes;  /* at least moek_ep_low_dim_workspace_size's answer */
} moek_ep_low_dim_group;

/* Bytes of the low-dimension workspace: two [max_tokens, r] buffers of dtype, the projections' offsets
 * and their split-K space. Reads only group->group.config (all but rank) and group->model_hidden. */
moek_status moek_ep_low_dim_workspace_size(const moek_ep_low_dim_group *group, size_t *bytes);

typedef struct moek_ep_low_dim_dispatch_args {
  moek_ep_low_dim_group group;
  int64_t num_tokens;              /* T of this rank, 0..max_tokens */
  const void *x;                   /* device [T, H], 16-byte aligned */
  const void *w_down;              /* device [r, H], 16-byte aligned: the descend projection */
  const int32_t *topk_ids;         /* device [T, k], global expert ids (as moek_ep_dispatch) */
  const float *topk_weights;       /* device [T, k] or NULL (weight 1) */
  int32_t *received_expert_offsets; /* device [E/R + 1], written (as moek_ep_dispatch) */
} moek_ep_low_dim_dispatch_args;

/* Enqueues the descend projection and the dispatch at width r. */
moek_status moek_ep_low_dim_dispatch(const moek_ep_low_dim_dispatch_args *args, cudaStream_t stream);

typedef struct moek_ep_low_dim_combine_args {
  moek_ep_low_dim_group group;
  int64_t num_tokens;              /* T of this rank's matching dispatch */
  const void *expert_out;          /* device [received rows, r], 16-byte aligned (as moek_ep_combine) */
  const void *w_up;                /* device [H, r], 16-byte aligned: the ascend projection */
  const void *residual;            /* device [T, H], 16-byte aligned, or NULL; must not overlap out (the
                                      projection is written to out before the residual is added) */
  void *out;                       /* device [T, H], 16-byte aligned, written */
} moek_ep_low_dim_combine_args;

/* Enqueues the combine at width r, the ascend projection and the residual add. */
moek_status moek_ep_low_dim_combine(const moek_ep_low_dim_combine_args *args, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* MOE_KERNELS_H */
