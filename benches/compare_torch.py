#!/usr/bin/env python3
"""PyTorch side-by-side for our benchmarks, on the same GPU in the same run.

Times each case as a PyTorch user writes it, both eager and replayed from a CUDA graph, measures the copy
bandwidth ceiling, and, given our bench JSON, prints the comparison table. Suites:
- route (benches/route.rs): softmax/sigmoid + topk; DeepSeek-V3's group-limited selection; Switch
  capacity with a cumsum;
- permute (benches/permute.rs): the plan with argsort + bincount + cumsum, permute with index_select,
  combine with a weighted index_add_.
- layer (benches/layer.rs): the whole MoE layer as a PyTorch user writes it: softmax/sigmoid + topk (the
  DeepSeek-V3 group-limited selection for that preset), argsort, index_select, torch._grouped_mm, silu,
  the routing weight, index_add_.
- gemm, alias grouped_gemm (benches/grouped_gemm.rs): torch._grouped_mm on the same shapes and offsets
  (SwiGLU after gate|up, the row scale after down, as a user writes them), the bare _grouped_mm, and the
  per-expert matmul loop a user would write.
- subbit (benches/subbit.rs): the bf16 product of the same shapes with dense weights (torch.bmm over the
  two experts' [rows, cols] weights, each token a row of both), beside our fused decode + matvec from
  0.71 bit/weight; the decode cases are timed as a bf16 copy of the dense weights (what the decode writes);
  the _gemm64 cases (64 rows on each expert) as the same bmm, beside our fused decode + grouped GEMM and
  our bf16 grouped GEMM on the dense weights.

    python3 benches/compare_torch.py --suite route --ours target/bench-route.json --out torch-route.json
"""
import argparse
import json

import torch
import torch.nn.functional as F

GRAPH_CALLS = 20


def deepseek_v3(logits, bias, n_group=8, topk_group=4, k=8, scale=2.5):
    t, e = logits.shape
    scores = logits.sigmoid()
    choice = scores + bias
    group_scores = choice.view(t, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    expert_mask = group_mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
    masked = choice.masked_fill(~expert_mask.bool(), float("-inf"))
    ids = masked.topk(k, dim=-1)[1]
    w = scores.gather(1, ids)
    return ids, w / w.sum(dim=-1, keepdim=True) * scale


def softmax_topk(logits, k, renormalize=False):
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    w, ids = probs.topk(k, dim=-1)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids, w


def switch(logits, capacity):
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    w, ids = probs.max(dim=-1)
    one_hot = F.one_hot(ids, logits.shape[1])
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1)
    keep = position <= capacity
    return torch.where(keep, ids, -1), torch.where(keep, w, 0.0), (~keep).sum()


def moge(logits, groups, k):
    t, e = logits.shape
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    w, local = probs.view(t, groups, e // groups).topk(k // groups, dim=-1)
    ids = local + torch.arange(groups, device=logits.device).view(1, groups, 1) * (e // groups)
    w = w.reshape(t, k)
    return ids.reshape(t, k), w / w.sum(dim=-1, keepdim=True)


def torch_plan(ids, num_experts):
    flat = ids.view(-1)
    order = torch.argsort(flat, stable=True)
    # torch.bincount reads its input's maximum back to the host, which a CUDA graph cannot capture;
    # scatter_add_ counts the same way without that.
    counts = torch.zeros(num_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, 0)
    pair_row = torch.empty_like(order)
    pair_row[order] = torch.arange(order.numel(), device=ids.device)
    return order, offsets, pair_row


def permute_cases():
    """Same names and shapes as benches/permute.rs (balanced random routing, E=256, k=8)."""
    def plan_case(t):
        ids = torch.randint(0, 256, (t, 8), device="cuda", dtype=torch.int64)
        return lambda: torch_plan(ids, 256)

    t, h, k = 16384, 7168, 8
    ids = torch.randint(0, 256, (t, k), device="cuda", dtype=torch.int64)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(t, k, device="cuda")
    order, _, _ = torch_plan(ids, 256)
    token_of_row = order // k
    rows = x.index_select(0, token_of_row)
    row_weight = w.view(-1)[order].to(torch.bfloat16).unsqueeze(1)

    def combine():
        out = torch.zeros(t, h, device="cuda", dtype=torch.bfloat16)
        return out.index_add_(0, token_of_row, rows * row_weight)

    return {
        "plan_E256_k8_T4096": plan_case(4096),
        "plan_E256_k8_T32768": plan_case(32768),
        "permute_bf16_T16384_H7168_k8": lambda: x.index_select(0, token_of_row),
        "combine_bf16_T16384_H7168_k8": combine,
    }


GEMM_MODELS = [
    # name, E, H, I, rows for T tokens (balanced routing)
    ("mixtral", 8, 4096, 14336, lambda t: t * 2),
    ("qwen3_30b_a3b", 128, 2048, 768, lambda t: t * 8),
    ("deepseek_v3_ep8", 32, 7168, 2048, lambda t: t * 8 * 32 // 256),
]
GEMM_TOKENS = [1, 16, 64, 256, 4096, 16384]
GEMM_UNEVEN_TOKENS = [4096]


def uneven_counts(rows, e):
    """benches/grouped_gemm.rs's uneven_offsets: shares proportional to 50 + (37 x mod 101), rounded down,
    the rows left over one each to the first experts."""
    weights = [50 + (37 * x) % 101 for x in range(e)]
    counts = [rows * w // sum(weights) for w in weights]
    left = rows - sum(counts)
    return [c + (x < left) for x, c in enumerate(counts)]


def gemm_routings(rows, e, t):
    """(case-name suffix, per-expert counts) of every routing measured at t tokens."""
    out = [("", [rows // e + (x < rows % e) for x in range(e)])]
    if t in GEMM_UNEVEN_TOKENS:
        out.append(("_uneven", uneven_counts(rows, e)))
    return out


def gemm_cases():
    """Same names, shapes and offsets (balanced; uneven too at T = 4096) as benches/grouped_gemm.rs.
    Each case: (full op, bare _grouped_mm, per-expert loop)."""
    bf16 = torch.bfloat16
    out = {}
    for name, e, h, i, rows_of in GEMM_MODELS:
        w_gate_up = torch.randn(e, 2 * i, h, device="cuda", dtype=bf16)
        w_down = torch.randn(e, h, i, device="cuda", dtype=bf16)
        for t, (routing, counts) in ((t, r) for t in GEMM_TOKENS for r in gemm_routings(rows_of(t), e, t)):
            rows = rows_of(t)
            bounds = [0]
            for c in counts:
                bounds.append(bounds[-1] + c)
            # _grouped_mm's offs: the groups' end rows, int32, no leading zero.
            offs = torch.tensor(bounds[1:], device="cuda", dtype=torch.int32)
            x = torch.randn(rows, h, device="cuda", dtype=bf16)
            mid = torch.randn(rows, i, device="cuda", dtype=bf16)
            scale = torch.rand(rows, 1, device="cuda", dtype=bf16)

            def gu_mm(x=x, w=w_gate_up, offs=offs):
                return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs, out_dtype=bf16)

            def gu(gu_mm=gu_mm, i=i):
                y = gu_mm()
                return F.silu(y[:, :i]) * y[:, i:]

            def gu_loop(x=x, w=w_gate_up, bounds=bounds, i=i):
                y = torch.cat([x[bounds[g]:bounds[g + 1]] @ w[g].T for g in range(len(bounds) - 1)])
                return F.silu(y[:, :i]) * y[:, i:]

            def dn_mm(mid=mid, w=w_down, offs=offs):
                return torch._grouped_mm(mid, w.transpose(-2, -1), offs=offs, out_dtype=bf16)

            def dn(dn_mm=dn_mm, scale=scale):
                return dn_mm() * scale

            def dn_loop(mid=mid, w=w_down, bounds=bounds, scale=scale):
                return torch.cat([mid[bounds[g]:bounds[g + 1]] @ w[g].T for g in range(len(bounds) - 1)]) * scale

            out[f"{name}_T{t}{routing}_gate_up"] = (gu, gu_mm, gu_loop)
            out[f"{name}_T{t}{routing}_down"] = (dn, dn_mm, dn_loop)
    return out


LAYER_PRESETS = [
    # name, E, H, I, k, routing
    ("mixtral", 8, 4096, 14336, 2, "softmax_renorm"),
    ("qwen3_30b_a3b", 128, 2048, 768, 8, "softmax_renorm"),
    ("deepseek_v3_slice32", 32, 7168, 2048, 8, "deepseek"),
]
LAYER_TOKENS = [1, 16, 64, 256, 4096, 16384]


def torch_layer(x, logits, bias, w_gate_up, w_down, k, routing):
    """One MoE layer the way a PyTorch user writes it (bf16 activations and weights)."""
    e, i = w_gate_up.shape[0], w_down.shape[2]
    if routing == "deepseek":
        ids, w = deepseek_v3(logits, bias, n_group=8, topk_group=4, k=k)
    else:
        w, ids = logits.softmax(dim=-1, dtype=torch.float32).topk(k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(e, dtype=flat.dtype, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    token = order // k
    rows = x.index_select(0, token)
    h = torch._grouped_mm(rows, w_gate_up.transpose(-2, -1), offs=offs, out_dtype=x.dtype)
    a = F.silu(h[:, :i]) * h[:, i:]
    y = torch._grouped_mm(a, w_down.transpose(-2, -1), offs=offs, out_dtype=x.dtype)
    y = y * w.reshape(-1)[order].to(x.dtype).unsqueeze(1)
    return torch.zeros_like(x).index_add_(0, token, y)


def layer_cases():
    """Same names and shapes as benches/layer.rs."""
    bf16 = torch.bfloat16
    out = {}
    for name, e, h, i, k, routing in LAYER_PRESETS:
        w_gate_up = torch.randn(e, 2 * i, h, device="cuda", dtype=bf16) / h ** 0.5
        w_down = torch.randn(e, h, i, device="cuda", dtype=bf16) / i ** 0.5
        bias = torch.rand(e, device="cuda") * 0.2 - 0.1
        for t in LAYER_TOKENS:
            x = torch.randn(t, h, device="cuda", dtype=bf16)
            logits = torch.rand(t, e, device="cuda") * 6 - 3
            out[f"layer_{name}_T{t}"] = (
                lambda x=x, logits=logits, bias=bias, w1=w_gate_up, w2=w_down, k=k, r=routing:
                torch_layer(x, logits, bias, w1, w2, k, r)
            )
    return out


def layer_table(ours, results):
    ceiling = results["copy_gbps"]
    nan = float("nan")
    print(f"GPU {results['gpu']}, torch {results['torch']}, measured copy bandwidth {ceiling:.0f} GB/s")
    print("| case | ours stream us | ours graph us | torch eager us | torch graph us | speed-up (graph) | "
          "TFLOP/s | weight floor us | fraction of floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in ours.items():
        # The fused and automatic cases compare with the same torch layer as the composed one.
        tc = results["cases"].get(name.removesuffix("_fused").removesuffix("_auto"), {})
        us = r["graph_us"]
        floor = r["bytes"] / (ceiling * 1e3)
        print(
            f"| {name} | {r['stream_us']:.1f} | {us:.1f} | {tc.get('eager_us', nan):.1f} | "
            f"{tc.get('graph_us', nan):.1f} | {tc.get('graph_us', nan) / us:.2f}x | "
            f"{r['flop'] / (us * 1e-6) / 1e12:.1f} | {floor:.1f} | {floor / us:.0%} |"
        )


def gemm_table(ours, results):
    ceiling = results["copy_gbps"]
    nan = float("nan")
    print(f"GPU {results['gpu']}, torch {results['torch']}, measured copy bandwidth {ceiling:.0f} GB/s")
    print("| case | ours graph us | torch graph us | torch _grouped_mm graph us | torch loop us | speed-up (graph) | "
          "TFLOP/s | GB/s | fraction of copy bw |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in ours.items():
        tc = results["cases"].get(name, {})
        us = r["graph_us"]
        tflops = r["flop"] / (us * 1e-6) / 1e12
        gbps = r["bytes"] / (us * 1e-6) / 1e9
        print(
            f"| {name} | {us:.1f} | {tc.get('graph_us', nan):.1f} | {tc.get('mm_graph_us', nan):.1f} | "
            f"{tc.get('loop_us', nan):.1f} | {tc.get('graph_us', nan) / us:.2f}x | {tflops:.1f} | {gbps:.0f} | "
            f"{gbps / ceiling:.0%} |"
        )


SUBBIT_SHAPES = [("mixtral_gate", 14336, 4096), ("mixtral_down", 4096, 14336)]


def subbit_cases():
    """Same names and shapes as benches/subbit.rs: two experts, T tokens each a row of both."""
    bf16 = torch.bfloat16
    out = {}
    for name, r, c in SUBBIT_SHAPES:
        w = torch.randn(2, r, c, device="cuda", dtype=bf16)
        for t in range(1, 9):
            x = torch.randn(2, t, c, device="cuda", dtype=bf16)
            out[f"{name}_T{t}"] = lambda x=x, w=w: torch.bmm(x, w.transpose(1, 2))
        dst = torch.empty_like(w)
        out[f"{name}_decode"] = lambda w=w, dst=dst: dst.copy_(w)
        # The grouped GEMM cases: 64 rows on each expert, the same bf16 product for both of ours (fused
        # from 0.71 bit, and our grouped GEMM on the dense weights).
        x = torch.randn(2, 64, c, device="cuda", dtype=bf16)
        for case in (f"{name}_gemm64", f"{name}_gemm64_dense_bf16"):
            out[case] = lambda x=x, w=w: torch.bmm(x, w.transpose(1, 2))
    return out


def subbit_table(ours, results):
    ceiling = results["copy_gbps"]
    nan = float("nan")
    print(f"GPU {results['gpu']}, torch {results['torch']}, measured copy bandwidth {ceiling:.0f} GB/s")
    print("| case | ours graph us | torch bf16 graph us | speed-up (graph) | GB/s read+written | fraction of copy bw | "
          "dense bf16 floor us |")
    print("|---|---|---|---|---|---|---|")
    for name, r in ours.items():
        tc = results["cases"].get(name, {})
        us = r["graph_us"]
        gbps = r["bytes"] / (us * 1e-6) / 1e9
        dense_floor = r["dense_weight_bytes"] / (ceiling * 1e3)
        print(
            f"| {name} | {us:.2f} | {tc.get('graph_us', nan):.2f} | {tc.get('graph_us', nan) / us:.2f}x | {gbps:.0f} | "
            f"{gbps / ceiling:.0%} | {dense_floor:.1f} |"
        )


def cases():
    """Same names and shapes as benches/route.rs."""
    return {
        "deepseek_v3_T4096": (4096, 256, torch.float32, lambda x, b: deepseek_v3(x, b)),
        "deepseek_v3_T65536": (65536, 256, torch.float32, lambda x, b: deepseek_v3(x, b)),
        "softmax_top8_of_128_T65536_f32": (65536, 128, torch.float32, lambda x, b: softmax_topk(x, 8)),
        "softmax_top8_of_128_T65536_bf16": (65536, 128, torch.bfloat16, lambda x, b: softmax_topk(x, 8)),
        "mixtral_T4096": (4096, 8, torch.float32, lambda x, b: softmax_topk(x, 2, True)),
        "switch_E128_T65536_capacity": (65536, 128, torch.float32, lambda x, b: switch(x, 640)),
        "moge_E64_G8_k8_T4096": (4096, 64, torch.float32, lambda x, b: moge(x, 8, 8)),
        "qwen3_softmax_top8_of_128_renorm_T65536": (65536, 128, torch.float32, lambda x, b: softmax_topk(x, 8, True)),
        "softmax_top8_of_256_T65536_f32": (65536, 256, torch.float32, lambda x, b: softmax_topk(x, 8)),
    }


def time_us(fn, reps=50, samples=11):
    fn()
    torch.cuda.synchronize()
    # Fewer repetitions for slow calls: about 5 ms a sample is plenty.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = max(1, min(reps, int(5000 / max(start.elapsed_time(end) * 1e3, 1e-3))))
    times = []
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def graph_us(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_CALLS):
            fn()
    return time_us(graph.replay, reps=10) / GRAPH_CALLS


def copy_gbps():
    n = 1 << 30  # 1 GiB each way, far beyond the 60 MB L2
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), reps=10, samples=7)
    return 2 * n / (us * 1e-6) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="route", choices=["route", "permute", "gemm", "grouped_gemm", "layer", "subbit"])
    ap.add_argument("--ours", help="JSON written by benches/<suite>.rs")
    ap.add_argument("--out", default="torch.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gbps": copy_gbps(), "cases": {}}
    if args.suite == "route":
        for name, (t, e, dtype, fn) in cases().items():
            x = (torch.rand(t, e, device="cuda") * 8 - 4).to(dtype)
            b = torch.rand(e, device="cuda") * 0.2 - 0.1
            results["cases"][name] = {"eager_us": time_us(lambda: fn(x, b)), "graph_us": graph_us(lambda: fn(x, b))}
    elif args.suite == "permute":
        for name, fn in permute_cases().items():
            results["cases"][name] = {"eager_us": time_us(fn), "graph_us": graph_us(fn)}
    elif args.suite == "subbit":
        for name, fn in subbit_cases().items():
            results["cases"][name] = {"eager_us": time_us(fn), "graph_us": graph_us(fn)}
    elif args.suite == "layer":
        # Only the torch cases our run measured (MOEK_BENCH_TOKENS may have narrowed it).
        wanted = None
        if args.ours:
            strip = lambda n: n.removesuffix("_fused").removesuffix("_auto")
            wanted = {strip(r["case"]) for r in json.load(open(args.ours))}
        for name, fn in layer_cases().items():
            if wanted is not None and name not in wanted:
                continue
            try:
                results["cases"][name] = {"eager_us": time_us(fn), "graph_us": graph_us(fn)}
            except RuntimeError as e:  # an older torch without _grouped_mm
                results["cases"][name] = {"error": str(e)}
    else:
        for name, (fn, mm, loop) in gemm_cases().items():
            try:
                results["cases"][name] = {
                    "eager_us": time_us(fn),
                    "graph_us": graph_us(fn),
                    "mm_graph_us": graph_us(mm),
                    "loop_us": time_us(loop),
                }
            except RuntimeError as e:  # an older torch without _grouped_mm, or a shape it refuses
                results["cases"][name] = {"error": str(e)}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    if not args.ours:
        print(json.dumps(results, indent=1))
        return
    ours = {r["case"]: r for r in json.load(open(args.ours))}
    if args.suite in ("gemm", "grouped_gemm"):
        gemm_table(ours, results)
        return
    if args.suite == "layer":
        layer_table(ours, results)
        return
    if args.suite == "subbit":
        subbit_table(ours, results)
        return
    ceiling = results["copy_gbps"]
    print(f"GPU {results['gpu']}, torch {results['torch']}, measured copy bandwidth {ceiling:.0f} GB/s")
    print("| case | ours stream us | ours graph us | torch eager us | torch graph us | speed-up eager | speed-up graph | GB/s (graph) | fraction of copy bw |")
    print("|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for name, r in ours.items():
        tc = results["cases"].get(name, {})
        gbps = r.get("logits_bytes", r["bytes"]) / (r["graph_us"] * 1e-6) / 1e9
        print(
            f"| {name} | {r['stream_us']:.2f} | {r['graph_us']:.2f} | {tc.get('eager_us', nan):.2f} | "
            f"{tc.get('graph_us', nan):.2f} | {tc.get('eager_us', nan) / r['stream_us']:.1f}x | "
            f"{tc.get('graph_us', nan) / r['graph_us']:.1f}x | {gbps:.0f} | {gbps / ceiling:.0%} |"
        )


if __name__ == "__main__":
    main()
