//! CPU-side grouped-GEMM tests (run everywhere): argument checks of the Rust configuration and of the C
//! interface, each failure naming its argument.

use half::{bf16, f16};
use moe_kernels::capi;
use moe_kernels::grouped_gemm::{Epilogue, GemmConfig, Layout, Tile};
use moe_kernels::{sys, Status};

const ROWS: Layout = Layout::Contiguous { max_rows: 64 };

#[test]
fn bad_shapes_name_their_field() {
    let ok = GemmConfig::new(8, 2880, 7168);
    ok.validate::<bf16, bf16>(ROWS).unwrap();
    ok.validate::<f16, f32>(Layout::Masked { capacity: 16 }).unwrap();
    GemmConfig { epilogue: Epilogue::SwiGlu, tile: Tile::Small, ..GemmConfig::new(1, 16, 8) }
        .validate::<bf16, f32>(Layout::Contiguous { max_rows: 0 })
        .unwrap();
    let cases = [
        (GemmConfig::new(0, 64, 64), ROWS, Status::InvalidNumExperts, "num_experts"),
        (GemmConfig::new(8193, 64, 64), ROWS, Status::InvalidNumExperts, "num_experts"),
        (GemmConfig::new(8, 0, 64), ROWS, Status::InvalidValue, "n = 0"),
        (GemmConfig::new(8, 12, 64), ROWS, Status::InvalidValue, "n = 12"),
        (GemmConfig::new(8, 1 << 22, 64), ROWS, Status::InvalidValue, "n = "),
        (GemmConfig::new(8, 64, 4), ROWS, Status::InvalidValue, "k = 4"),
        (GemmConfig::new(8, 64, 36), ROWS, Status::InvalidValue, "k = 36"),
        (GemmConfig { epilogue: Epilogue::SwiGlu, ..GemmConfig::new(8, 24, 64) }, ROWS, Status::InvalidValue, "SwiGLU"),
        (GemmConfig::new(8, 64, 64), Layout::Contiguous { max_rows: 1 << 31 }, Status::InvalidValue, "max_rows"),
        (GemmConfig::new(8, 64, 64), Layout::Masked { capacity: 1 << 28 }, Status::InvalidCapacity, "capacity"),
    ];
    for (cfg, layout, status, name) in cases {
        let err = cfg.validate::<bf16, bf16>(layout).expect_err("accepted a bad shape");
        assert_eq!(err.status, status, "{cfg:?} {layout:?}: {err}");
        assert!(err.message.contains(name), "{cfg:?}: '{}' does not name {name}", err.message);
    }
    // The output is the input type or f32.
    let err = GemmConfig::new(8, 64, 64).validate::<bf16, f16>(ROWS).expect_err("bf16 -> f16 accepted");
    assert_eq!(err.status, Status::InvalidDtype);
    assert!(err.message.contains("out_dtype"), "{}", err.message);
}

fn valid_args() -> sys::moek_grouped_gemm_args {
    let bf16 = sys::moek_dtype_MOEK_DTYPE_BF16;
    let mut a = GemmConfig::new(16, 128, 256).to_args(ROWS, bf16, bf16);
    a.a = 0x1000 as *const _;
    a.b = 0x2000 as *const _;
    a.expert_offsets = 0x3000 as *const i32;
    a.out = 0x4000 as *mut _;
    a
}

#[test]
fn c_interface_checks_grouped_gemm_arguments() {
    let stream = std::ptr::null_mut();
    let call = |a: &sys::moek_grouped_gemm_args| unsafe { capi::moek_grouped_gemm(a, stream) };
    let message =
        || unsafe { std::ffi::CStr::from_ptr(capi::moek_last_error_message()) }.to_string_lossy().into_owned();
    assert_eq!(unsafe { capi::moek_grouped_gemm(std::ptr::null(), stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);

    type Edit = fn(&mut sys::moek_grouped_gemm_args);
    let cases: [(Edit, sys::moek_status, &str); 14] = [
        (|a| a.dtype = sys::moek_dtype_MOEK_DTYPE_F32, sys::moek_status_MOEK_ERROR_INVALID_DTYPE, "dtype"),
        (|a| a.out_dtype = 7, sys::moek_status_MOEK_ERROR_INVALID_DTYPE, "out_dtype"),
        (|a| a.epilogue = 4, sys::moek_status_MOEK_ERROR_INVALID_ENUM, "epilogue"),
        (|a| a.tile = 6, sys::moek_status_MOEK_ERROR_INVALID_ENUM, "tile"),
        (|a| a.layout = 2, sys::moek_status_MOEK_ERROR_INVALID_ENUM, "layout"),
        (|a| a.max_rows = -1, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "max_rows"),
        (|a| a.a = std::ptr::null(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "a is NULL"),
        (|a| a.a = 0x1008 as *const _, sys::moek_status_MOEK_ERROR_MISALIGNED, "a = "),
        (|a| a.b = std::ptr::null(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "b is NULL"),
        (|a| a.b = 0x2004 as *const _, sys::moek_status_MOEK_ERROR_MISALIGNED, "b = "),
        (|a| a.expert_offsets = std::ptr::null(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "expert_offsets"),
        (|a| a.row_scale = 0x5002 as *const f32, sys::moek_status_MOEK_ERROR_MISALIGNED, "row_scale"),
        (|a| a.out = 0x4002 as *mut _, sys::moek_status_MOEK_ERROR_MISALIGNED, "out"),
        (
            |a| {
                a.layout = sys::moek_gemm_layout_MOEK_GEMM_MASKED;
                a.capacity = 8;
            },
            sys::moek_status_MOEK_ERROR_NULL_POINTER,
            "expert_counts",
        ),
    ];
    for (edit, status, name) in cases {
        let mut a = valid_args();
        edit(&mut a);
        assert_eq!(call(&a), status, "{}", message());
        assert!(message().contains(name), "'{}' does not name {name}", message());
    }
    // With no rows, a and out may be NULL (the checks pass; only the launch remains).
    let mut a = valid_args();
    a.max_rows = 0;
    a.a = std::ptr::null();
    a.out = std::ptr::null_mut();
    a.b = 0x2001 as *const _;
    assert_eq!(call(&a), sys::moek_status_MOEK_ERROR_MISALIGNED, "b is still checked");
}

#[test]
fn workspace_query_follows_the_split() {
    let rows = |max_rows| Layout::Contiguous { max_rows };
    // Forced slices: split_k floats per row and column of the product (SwiGLU: both halves).
    let forced = GemmConfig { split_k: 3, ..GemmConfig::new(16, 128, 256) };
    assert_eq!(forced.workspace_bytes(rows(64)).unwrap(), 3 * 64 * 128 * 4);
    let swiglu = GemmConfig { epilogue: Epilogue::SwiGlu, ..forced };
    assert_eq!(swiglu.workspace_bytes(Layout::Masked { capacity: 5 }).unwrap(), 3 * 16 * 5 * 128 * 4);
    // No rows, or one slice: nothing.
    assert_eq!(forced.workspace_bytes(rows(0)).unwrap(), 0);
    assert_eq!(GemmConfig { split_k: 1, ..forced }.workspace_bytes(rows(64)).unwrap(), 0);
    if std::env::var_os("MOEK_GEMM_SPLIT_K").is_none() && std::env::var_os("MOEK_GEMM_TILE").is_none() {
        // Automatic: the slices the bytes imply (S floats per row and column of the product).
        let slices =
            |cfg: GemmConfig, max_rows: usize| cfg.workspace_bytes(rows(max_rows)).unwrap() / (max_rows * cfg.n * 4);
        // Sized from the tiles sure to exist (all rows on one expert) and the H200 sweep (see
        // SPLIT_TARGET_CTAS): Mixtral's down projection at T = 1 (2 rows, at least 64 SMALL tiles of
        // K = 14336) splits 4 ways; a DeepSeek-V3 expert's gate|up at T = 1 (64 tiles, K = 7168) 4 ways;
        // a 64-row shared expert of the same shape takes the SMALL tile (32 MEDIUM_K64 tiles would not
        // cover the SMs; 128 SMALL ones) and splits 3 ways.
        let down = GemmConfig::new(8, 4096, 14336);
        assert_eq!(slices(down, 2), 4);
        let deepseek_gate_up = GemmConfig { epilogue: Epilogue::SwiGlu, ..GemmConfig::new(32, 4096, 7168) };
        assert_eq!(slices(deepseek_gate_up, 1), 4);
        let shared_gate_up = GemmConfig { epilogue: Epilogue::SwiGlu, ..GemmConfig::new(1, 4096, 7168) };
        assert_eq!(slices(shared_gate_up, 64), 3);
        // Not split: Mixtral's gate|up at T = 1 (448 tiles), short K (a DeepSeek-V3 down projection,
        // K = 2048; Qwen3's down, K = 768), Mixtral's down at T = 16 (up to 512 tiles when spread),
        // prefill, and Qwen3's gate|up at T = 16 (128 rows could sit on one expert but are not cut).
        let gate_up = GemmConfig { epilogue: Epilogue::SwiGlu, ..GemmConfig::new(8, 28672, 4096) };
        assert_eq!(gate_up.workspace_bytes(rows(2)).unwrap(), 0);
        assert_eq!(GemmConfig::new(32, 7168, 2048).workspace_bytes(rows(8)).unwrap(), 0);
        assert_eq!(GemmConfig::new(128, 2048, 768).workspace_bytes(rows(8)).unwrap(), 0);
        assert_eq!(down.workspace_bytes(rows(32)).unwrap(), 0);
        assert_eq!(down.workspace_bytes(rows(65536)).unwrap(), 0);
        assert_eq!(gate_up.workspace_bytes(rows(128)).unwrap(), 0);
        let qwen3_gate_up = GemmConfig { epilogue: Epilogue::SwiGlu, ..GemmConfig::new(128, 1536, 2048) };
        assert_eq!(qwen3_gate_up.workspace_bytes(rows(128)).unwrap(), 0);
        // The slices' fp32 traffic stays small against the weights: one expert, K = 256 (4 k-tiles,
        // 512 bytes of weights per column) against 64 rows (8 bytes per row and column a slice): none.
        assert_eq!(GemmConfig::new(1, 64, 256).workspace_bytes(rows(64)).unwrap(), 0);
        // K = 8 is one k-tile: nothing to split automatically.
        assert_eq!(GemmConfig::new(1, 64, 8).workspace_bytes(rows(1)).unwrap(), 0);
    }
    // The query checks the shape like the call.
    let err = GemmConfig { split_k: 65, ..forced }.workspace_bytes(rows(64)).expect_err("split_k = 65 accepted");
    assert_eq!(err.status, Status::InvalidValue);
    assert!(err.message.contains("split_k"), "{}", err.message);
    let err = GemmConfig::new(0, 64, 64).workspace_bytes(rows(64)).expect_err("E = 0 accepted");
    assert_eq!(err.status, Status::InvalidNumExperts);
}

#[test]
fn c_interface_checks_the_workspace() {
    let mut bytes = 0usize;
    let size = |a: &sys::moek_grouped_gemm_args, b: *mut usize| unsafe { capi::moek_grouped_gemm_workspace_size(a, b) };
    let message =
        || unsafe { std::ffi::CStr::from_ptr(capi::moek_last_error_message()) }.to_string_lossy().into_owned();
    assert_eq!(
        unsafe { capi::moek_grouped_gemm_workspace_size(std::ptr::null(), &mut bytes) },
        sys::moek_status_MOEK_ERROR_NULL_POINTER
    );
    let mut a = valid_args();
    a.split_k = 2;
    assert_eq!(size(&a, std::ptr::null_mut()), sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert!(message().contains("bytes"), "{}", message());
    // Pointers do not matter to the query.
    a.a = std::ptr::null();
    assert_eq!(size(&a, &mut bytes), sys::moek_status_MOEK_SUCCESS);
    assert_eq!(bytes, 2 * 64 * 128 * 4);
    a.split_k = -1;
    assert_eq!(size(&a, &mut bytes), sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    assert!(message().contains("split_k"), "{}", message());

    // A forced split needs the workspace: too few bytes, NULL, misaligned, each named.
    let stream = std::ptr::null_mut();
    let call = |a: &sys::moek_grouped_gemm_args| unsafe { capi::moek_grouped_gemm(a, stream) };
    type Edit = fn(&mut sys::moek_grouped_gemm_args);
    let cases: [(Edit, sys::moek_status, &str); 4] = [
        (
            |a| a.workspace_bytes = 2 * 64 * 128 * 4 - 1,
            sys::moek_status_MOEK_ERROR_WORKSPACE_TOO_SMALL,
            "workspace_bytes",
        ),
        (|a| a.workspace = std::ptr::null_mut(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "workspace is NULL"),
        (|a| a.workspace = 0x6008 as *mut _, sys::moek_status_MOEK_ERROR_MISALIGNED, "workspace = "),
        (|a| a.split_k = 65, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "split_k"),
    ];
    for (edit, status, name) in cases {
        let mut a = valid_args();
        a.split_k = 2;
        a.workspace = 0x6000 as *mut _;
        a.workspace_bytes = 2 * 64 * 128 * 4;
        edit(&mut a);
        assert_eq!(call(&a), status, "{}", message());
        assert!(message().contains(name), "'{}' does not name {name}", message());
    }
    // Unused, a workspace may be NULL whatever workspace_bytes says, but a given one must be aligned.
    let mut a = valid_args();
    a.split_k = 1;
    a.workspace_bytes = 1 << 20;
    a.workspace = 0x6004 as *mut _;
    assert_eq!(call(&a), sys::moek_status_MOEK_ERROR_MISALIGNED);
    assert!(message().contains("workspace = "), "{}", message());
    a.workspace = std::ptr::null_mut();
    a.b = 0x2001 as *const _;
    assert_eq!(call(&a), sys::moek_status_MOEK_ERROR_MISALIGNED);
    assert!(message().contains("b = "), "{}", message());
}

#[test]
fn hopper_tile_validates_and_reports_availability() {
    GemmConfig { tile: Tile::Hopper, ..GemmConfig::new(8, 2880, 7168) }.validate::<bf16, bf16>(ROWS).unwrap();
    GemmConfig { tile: Tile::Hopper64, ..GemmConfig::new(8, 2880, 7168) }.validate::<bf16, bf16>(ROWS).unwrap();
    // Out-of-range expert counts are never available; without a GPU (or kernels) nothing is.
    assert_eq!(capi::moek_grouped_gemm_hopper_available(0), 0);
    assert_eq!(capi::moek_grouped_gemm_hopper_available(8193), 0);
    let available = capi::moek_grouped_gemm_hopper_available(8);
    assert!(available == 0 || available == 1);
}

#[test]
fn hopper_tile_never_splits() {
    // The sm_90a kernel (both tile sizes) ignores split_k: no workspace, even when the slices are forced.
    let rows = Layout::Contiguous { max_rows: 4096 };
    let hopper = GemmConfig { tile: Tile::Hopper, split_k: 4, ..GemmConfig::new(8, 2880, 7168) };
    assert_eq!(hopper.workspace_bytes(rows).unwrap(), 0);
    assert_eq!(GemmConfig { split_k: 0, ..hopper }.workspace_bytes(rows).unwrap(), 0);
    let hopper64 = GemmConfig { tile: Tile::Hopper64, ..hopper };
    assert_eq!(hopper64.workspace_bytes(Layout::Contiguous { max_rows: 512 }).unwrap(), 0);
    assert_eq!(GemmConfig { split_k: 0, ..hopper64 }.workspace_bytes(Layout::Masked { capacity: 64 }).unwrap(), 0);
    // The same forced split on the portable LARGE tile does need it.
    let large = GemmConfig { tile: Tile::Large, ..hopper };
    assert_eq!(large.workspace_bytes(rows).unwrap(), 4 * 4096 * 2880 * 4);
    if std::env::var_os("MOEK_GEMM_SPLIT_K").is_none() && std::env::var_os("MOEK_GEMM_TILE").is_none() {
        // AUTO at prefill sizes (HOPPER or LARGE, whichever the device allows) never splits by itself.
        assert_eq!(GemmConfig::new(8, 2880, 7168).workspace_bytes(rows).unwrap(), 0);
    }
}
