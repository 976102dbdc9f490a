//! Expert-parallel dispatch and combine with one process per GPU (CUDA IPC handles) on 2 and 4 GPUs,
//! against the CPU reference of the whole group.
//!
//! The test process re-executes its own binary once per rank (the rank in `MOEK_EP_IPC_CHILD`); each
//! child drives GPU r, publishes its handle (hex) as a file in a shared temporary folder, reads every
//! other rank's, connects, and runs rounds with random routing, every token to one rank, dropped ids
//! and T = 0 on a rank. Every child builds every rank's inputs from one shared seed, so each checks
//! its own received rows (exactly), its combined outputs (within tolerance) and a bit-identical rerun.
//! The parent requires every child to exit 0 within a deadline and kills them past it (a deadlock
//! fails the test instead of hanging it). Skipped (with a notice) when fewer GPUs are present;
//! `MOEK_REQUIRE_GPUS=N` makes N required.

mod common;
#[path = "common/ep.rs"]
mod ep_common;

use cudarc::driver::CudaContext;
use ep_common::{make_rank, round, RankBuffers, RankData, Routing};
use moe_kernels::ep::{EpConfig, IpcHandle, IpcRank, IPC_HANDLE_BYTES};
use moe_kernels::sys;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Set in a child: `rank,num_ranks,seed,folder`.
const CHILD_ENV: &str = "MOEK_EP_IPC_CHILD";
/// How long the parent waits for every child (CUDA start-up on 4 GPUs included).
const CHILD_DEADLINE: Duration = Duration::from_secs(180);
/// How long a child waits for its peers at a file barrier.
const BARRIER_DEADLINE: Duration = Duration::from_secs(120);

#[test]
fn dispatch_and_combine_over_ipc_on_two_gpus() {
    run(2, "dispatch_and_combine_over_ipc_on_two_gpus");
}

#[test]
fn dispatch_and_combine_over_ipc_on_four_gpus() {
    run(4, "dispatch_and_combine_over_ipc_on_four_gpus");
}

/// The parent's part, or a child's when this process is one.
fn run(num_ranks: usize, test: &str) {
    match std::env::var(CHILD_ENV) {
        Ok(spec) => child(&spec),
        Err(_) => parent(num_ranks, test),
    }
}

fn parent(num_ranks: usize, test: &str) {
    if !ep_common::have_gpus(num_ranks) {
        return;
    }
    let seed: u64 = common::rng(test).random();
    let folder = std::env::temp_dir().join(format!("moek-ep-ipc-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&folder);
    std::fs::create_dir_all(&folder).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<Option<Child>> = (0..num_ranks)
        .map(|r| {
            let spec = format!("{r},{num_ranks},{seed},{}", folder.display());
            let cmd = Command::new(&exe)
                .args(["--exact", test, "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, spec)
                .spawn()
                .unwrap();
            Some(cmd)
        })
        .collect();
    let failure = wait_all(&mut children);
    let _ = std::fs::remove_dir_all(&folder);
    if let Some(why) = failure {
        panic!("{test} (seed {seed}): {why}");
    }
}

/// Waits for every child; on the first failure or past the deadline kills the rest (each by its own
/// id) and says why.
fn wait_all(children: &mut [Option<Child>]) -> Option<String> {
    let start = Instant::now();
    let mut failure = None;
    while failure.is_none() && children.iter().any(Option::is_some) {
        for (r, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            match c.try_wait().unwrap() {
                Some(status) if status.success() => *slot = None,
                Some(status) => {
                    failure = Some(format!("rank {r} failed ({status})"));
                    *slot = None;
                }
                None => {}
            }
        }
        if failure.is_none() && start.elapsed() > CHILD_DEADLINE {
            let left: Vec<usize> = (0..children.len()).filter(|&r| children[r].is_some()).collect();
            failure = Some(format!("ranks {left:?} did not finish within {CHILD_DEADLINE:?} (a deadlock?)"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in children.iter_mut().flatten() {
        let _ = c.kill();
        let _ = c.wait();
    }
    failure
}

fn child(spec: &str) {
    let parts: Vec<&str> = spec.splitn(4, ',').collect();
    let rank: usize = parts[0].parse().unwrap();
    let num_ranks: usize = parts[1].parse().unwrap();
    let seed: u64 = parts[2].parse().unwrap();
    let folder = Path::new(parts[3]);
    let stream = CudaContext::new(rank).unwrap().new_stream().unwrap();
    // The same sequence in every child: every rank's inputs and hence the whole reference.
    let mut rng = StdRng::seed_from_u64(seed);
    let nr = num_ranks as u32;
    // (E, k, H): Mixtral-like, odd E and H, DeepSeek-like, one expert per rank.
    let shapes = [(8u32, 2u32, 2880usize), (60, 6, 512), (256, 8, 1024), (nr, 1, 64)];
    for (i, (e, k, h)) in shapes.into_iter().enumerate() {
        if e % nr != 0 {
            continue;
        }
        let max_tokens = 300;
        let cfg = EpConfig {
            num_ranks: nr,
            num_experts: e,
            k,
            hidden: h,
            max_tokens,
            dtype: sys::moek_dtype_MOEK_DTYPE_BF16,
            capacity: 0,
        };
        let mut ipc = IpcRank::new(cfg, rank as u32, &stream).unwrap();
        // Published only after new returned (its zero fill done), so holding every handle means every
        // rank's buffer is zero: the exchange is the barrier the first dispatch needs.
        let handles = exchange(folder, &format!("handle-{i}"), rank, num_ranks, &hex(&ipc.export_handle()));
        let handles: Vec<IpcHandle> = handles.iter().map(|s| unhex(s)).collect();
        ipc.connect(&handles).unwrap();
        assert!(ipc.is_connected());
        // Tokens per rank: T = 0 and 1 somewhere, the maximum somewhere.
        let pattern = [33usize, 0, 1, max_tokens];
        let counts: Vec<usize> = (0..num_ranks).map(|r| pattern[r % pattern.len()]).collect();
        let mut bufs: Option<Vec<RankBuffers>> = None;
        for routing in [Routing::Random, Routing::AllToOneRank, Routing::SomeDropped] {
            if matches!(routing, Routing::AllToOneRank) && (k as usize) > cfg.local_experts() {
                continue;
            }
            let data: Vec<RankData> = counts.iter().map(|&t| make_rank(&mut rng, &cfg, t, routing)).collect();
            let bufs = bufs.get_or_insert_with(|| vec![RankBuffers::new(&ipc, &cfg, &data[rank])]);
            let case = format!("IPC rank {rank}: R={nr} E={e} k={k} H={h} T={counts:?} {routing:?}");
            let first = round(&[&ipc], &cfg, &data, bufs, &case);
            let again = round(&[&ipc], &cfg, &data, bufs, &case);
            assert_eq!(first, again, "{case}: outputs differ between two identical runs");
        }
        // Orderly teardown: every rank closes the others' buffers before any rank frees its own.
        ipc.disconnect();
        assert!(!ipc.is_connected() || num_ranks == 1);
        exchange(folder, &format!("closed-{i}"), rank, num_ranks, "");
    }
}

/// Publishes `value` as this rank's entry `name` and returns every rank's, in rank order, once all
/// are there (a file barrier; panics past [`BARRIER_DEADLINE`]).
fn exchange(folder: &Path, name: &str, rank: usize, num_ranks: usize, value: &str) -> Vec<String> {
    let path = |r: usize| -> PathBuf { folder.join(format!("{name}.{r}")) };
    // Written whole, then renamed: a reader never sees half a file.
    let tmp = folder.join(format!("{name}.{rank}.tmp"));
    std::fs::write(&tmp, value).unwrap();
    std::fs::rename(&tmp, path(rank)).unwrap();
    let start = Instant::now();
    loop {
        if (0..num_ranks).all(|r| path(r).exists()) {
            return (0..num_ranks).map(|r| std::fs::read_to_string(path(r)).unwrap()).collect();
        }
        assert!(start.elapsed() < BARRIER_DEADLINE, "rank {rank}: peers missing at {name} after {BARRIER_DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> IpcHandle {
    assert_eq!(s.len(), 2 * IPC_HANDLE_BYTES, "a handle is {IPC_HANDLE_BYTES} bytes: {s:?}");
    let mut h = [0u8; IPC_HANDLE_BYTES];
    for (i, b) in h.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    h
}
