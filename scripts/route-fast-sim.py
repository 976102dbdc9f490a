#!/usr/bin/env python3
"""Simulates the selection of cuda/route_fast.cuh on the CPU (no GPU, no CUDA): the lane layout, the
threshold (the k-th largest of the 16 lane heads' 16-bit keys, by two bitonic sorts in one word),
the candidate packing and the rank-by-counting of up to 16 candidates (a rank is the count of
candidates whose value exceeds it, from the sign of an f32 difference; equal values send the token
to the rounds), checked against a brute-force top-k (ties to the lower index) on random rows,
including exact ties, signed zeros and -inf. Then prints how many candidates the threshold leaves
for softmax top-8 of 128 (the numbers quoted in route_fast.cuh).

    python3 scripts/route-fast-sim.py [seed]
"""
import random, struct, math, sys
L=8
def f32(x): return struct.unpack('f', struct.pack('f', x))[0]
def bits(f): return struct.unpack('I', struct.pack('f', f))[0]
def from_bits(b): return struct.unpack('f', struct.pack('I', b))[0]
def key32(f):
    b=bits(f)
    return b ^ (0xffffffff if b & 0x80000000 else 0x80000000)
def key_to_float(k):
    b = (k & 0x7fffffff) if k & 0x80000000 else (~k & 0xffffffff)
    return from_bits(b)
def sign_of_difference(a, b):
    """Sign bit of the f32 a - b as the GPU computes it (RN, subnormals kept, NaN positive)."""
    if math.isnan(a) or math.isnan(b) or (math.isinf(a) and math.isinf(b) and a == b): return 0
    d = f32(a - b)
    if d == 0.0:
        # RN: x - x is +0, except (-0) - (+0) = -0.
        return 1 if (math.copysign(1, a) < 0 and math.copysign(1, b) > 0) else 0
    return 1 if d < 0 else 0
def keeps_max(rank,size,j,asc): return (((rank & size)==0) == ((rank & j)==0)) != asc
def fmax(a,b): return a if a>=b else b
def fmin(a,b): return a if a<=b else b
def kth_head(t1,t2,k):
    # both lists as 16-bit keys (the high half of the order-preserving key), sorted descending
    a=[key32(v)>>16 for v in t1]; b=[key32(v)>>16 for v in t2]
    size=2
    while size<=L:
        j=size//2
        while j>0:
            oa=[a[r^j] for r in range(L)]; ob=[b[r^j] for r in range(L)]
            a=[max(a[r],oa[r]) if keeps_max(r,size,j,False) else min(a[r],oa[r]) for r in range(L)]
            b=[max(b[r],ob[r]) if keeps_max(r,size,j,False) else min(b[r],ob[r]) for r in range(L)]
            j//=2
        size*=2
    c=[max(a[r], b[max(k-1-r,0)]) if r<k else 0xffff for r in range(L)]
    return key_to_float(min(c)<<16)
def route(row, k, VEC, NV):
    E=len(row); chunks=E//VEC; CPL=NV//VEC
    x=[[-math.inf]*NV for _ in range(L)]
    for r in range(L):
        for j in range(CPL):
            c=r+j*L
            if c<chunks:
                for v in range(VEC): x[r][j*VEC+v]=row[c*VEC+v]
    t1=[];t2=[]
    for r in range(L):
        s=sorted(x[r],reverse=True); t1.append(s[0]); t2.append(s[1])
    tau=kth_head(t1,t2,k)
    # candidate: x >= tau as an f32 comparison (NaN tau: none)
    masks=[[s for s in range(NV) if x[r][s]>=tau] for r in range(L)]
    n=sum(len(m) for m in masks)
    if not (tau>-math.inf and n>=k and n<=16): return None, n
    cand=[]
    for r in range(L):
        for s in reversed(masks[r]):
            e=(r+(s//VEC)*L)*VEC+s%VEC
            cand.append((row[e],e))
    ranks=[sum(sign_of_difference(v, u) for u,_ in cand) for v,_ in cand]
    if 2*sum(ranks) != n*(n-1): return None, n  # equal values: the rounds
    sel=[None]*k
    for (v,e),rk in zip(cand,ranks):
        if rk<k: sel[rk]=e
    return sel, n
def brute(row,k):
    idx=sorted(range(len(row)), key=lambda e:(-key32(row[e]), e))
    return idx[:k]
random.seed(int(sys.argv[1]) if len(sys.argv)>1 else 1)
stats={'ok':0,'fallback':0}; ns=[]
for it in range(20000):
    VEC=random.choice([4,8]); 
    E=random.choice([VEC*8, 60 if VEC==4 else 64, 128, 96, 200 if VEC==8 else 196, 256, 36, 132])
    if E%VEC: continue
    chunks=E//VEC
    if chunks<8: continue
    NV=16 if (chunks+7)//8*VEC<=16 else 32
    if (chunks+7)//8*VEC>32: continue
    k=random.randint(1,min(8,E))
    mode=random.random()
    if mode<0.5: row=[f32(random.uniform(-4,4)) for _ in range(E)]
    elif mode<0.7: row=[float(random.randint(-30,30))/8 for _ in range(E)]  # many ties
    elif mode<0.8: row=[float(random.randint(0,3)) for _ in range(E)]
    elif mode<0.9: row=[random.choice([0.0,-0.0,1.0,-1.0]) for _ in range(E)]
    else:
        row=[f32(random.uniform(-4,4)) for _ in range(E)]
        for _ in range(random.randint(1,E)): row[random.randrange(E)]=-math.inf
    got,n=route(row,k,VEC,NV)
    if got is None: stats['fallback']+=1; continue
    ns.append(n)
    exp=brute(row,k)
    if got!=exp:
        print("MISMATCH",E,k,VEC,NV,got,exp,n); sys.exit(1)
    stats['ok']+=1
print(stats)
import collections
print("candidates per token over the cases above:", sorted(collections.Counter(ns).items()))

# Softmax top-8 of 128, uniform logits in [-4, 4): how many candidates the threshold leaves.
counts = collections.Counter()
for _ in range(4000):
    row = [f32(random.uniform(-4, 4)) for _ in range(128)]
    got, n = route(row, 8, 4, 16)
    counts[n] += 1
    assert got is None or got == brute(row, 8)
print("E=128 k=8 f32: mean", sum(k * v for k, v in counts.items()) / 4000, sorted(counts.items()))
