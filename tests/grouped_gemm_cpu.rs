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
        (|a| a.tile = 9, sys::moek_status_MOEK_ERROR_INVALID_ENUM, "tile"),
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
fn hopper_tile_validates_and_reports_availability() {
    GemmConfig { tile: Tile::Hopper, ..GemmConfig::new(8, 2880, 7168) }.validate::<bf16, bf16>(ROWS).unwrap();
    // Out-of-range expert counts are never available; without a GPU (or kernels) nothing is.
    assert_eq!(capi::moek_grouped_gemm_hopper_available(0), 0);
    assert_eq!(capi::moek_grouped_gemm_hopper_available(8193), 0);
    let available = capi::moek_grouped_gemm_hopper_available(8);
    assert!(available == 0 || available == 1);
}
