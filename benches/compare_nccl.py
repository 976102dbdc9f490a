#!/usr/bin/env python3
"""NCCL's all_to_all_single (through torch.distributed) with the bytes of our expert-parallel dispatch,
on the same GPUs in the same run, beside benches/ep.rs's JSON.

Each of R processes sends T*k rows of H bf16 (equal splits, its own share included), as our dispatch of
T tokens with k experts each does for balanced routing; combine moves the same bytes back. Timed per call
with CUDA events over repetitions, slowest rank's median. Multicast stays off (shared/GPU.md).

    python3 benches/compare_nccl.py --ranks 4 --tokens 128,4096 --ours target/bench-ep.json --out nccl.json
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

H, K = 7168, 8
REPS, SAMPLES = 20, 7


def worker(rank, ranks, tokens, port, queue):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    results = {}
    for t in tokens:
        send = torch.randn(t * K, H, device="cuda", dtype=torch.bfloat16)
        recv = torch.empty_like(send)
        for _ in range(5):
            dist.all_to_all_single(recv, send)
        torch.cuda.synchronize()
        times = []
        for _ in range(SAMPLES):
            dist.barrier()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(REPS):
                dist.all_to_all_single(recv, send)
            end.record()
            end.synchronize()
            us = torch.tensor([start.elapsed_time(end) * 1e3 / REPS], device="cuda")
            dist.all_reduce(us, op=dist.ReduceOp.MAX)
            times.append(us.item())
        results[t] = sorted(times)[len(times) // 2]
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=min(4, torch.cuda.device_count()))
    ap.add_argument("--tokens", default="128,4096")
    ap.add_argument("--ours", help="JSON written by benches/ep.rs")
    ap.add_argument("--out", default="nccl.json")
    ap.add_argument("--port", type=int, default=29517)
    args = ap.parse_args()
    tokens = [int(v) for v in args.tokens.split(",")]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.ranks, tokens, args.port, queue)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    results = queue.get()
    for p in procs:
        p.join()
    rows = []
    for t in tokens:
        nbytes = t * K * H * 2
        rows.append({"case": f"all_to_all_single R={args.ranks} T={t}", "us": results[t], "bytes_per_rank": nbytes,
                     "gbps_per_rank": nbytes / (results[t] * 1e-6) / 1e9, "torch": torch.__version__,
                     "nccl": ".".join(map(str, torch.cuda.nccl.version()))})
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    ours = {r["case"]: r for r in json.load(open(args.ours))} if args.ours else {}
    print(f"| case | NCCL us | ours graph us | ours stream us | speed-up (graph) | ours GB/s per rank |")
    print("|---|---|---|---|---|---|")
    for t in tokens:
        nccl = results[t]
        for name in ("dispatch", "combine"):
            o = ours.get(f"{name} R={args.ranks} T={t}")
            if o:
                print(f"| {name} T={t} | {nccl:.1f} | {o['graph_us']:.1f} | {o['stream_us']:.1f} | "
                      f"{nccl / o['graph_us']:.2f}x | {o['gbps_per_rank']:.0f} |")
            else:
                print(f"| {name} T={t} | {nccl:.1f} | - | - | - | - |")
        # Low-dimension rows (MOEK_EP_LOW_DIM_R): against full-width dispatch + combine through NCCL, two
        # all_to_all_single of T*k rows of H (the acceptance: 3x at T=4096).
        prefix = f"lowdim dispatch+combine R={args.ranks} T={t} r="
        for case, o in ours.items():
            if case.startswith(prefix):
                r = case[len(prefix):]
                print(f"| lowdim r={r} dispatch+combine T={t} (vs 2 x NCCL full width) | {2 * nccl:.1f} | "
                      f"{o['graph_us']:.1f} | {o['stream_us']:.1f} | {2 * nccl / o['graph_us']:.2f}x | - |")


if __name__ == "__main__":
    main()
