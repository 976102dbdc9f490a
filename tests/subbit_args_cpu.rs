//! CPU-side tests of the sub-1-bit kernels' C interface (run everywhere): parsing fills the descriptor
//! the Rust side computes, the image is the one the Rust side writes, and every bad argument is refused
//! with its named status before anything could be enqueued (no call here reaches a kernel).

use moe_kernels::capi;
use moe_kernels::subbit::{encode, random_iid, Compressed};
use moe_kernels::sys;
use rand::SeedableRng;
use std::os::raw::c_void;

fn buffer() -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let ms = vec![random_iid(&mut rng, 5, 700, 0.885), random_iid(&mut rng, 5, 700, 0.885)];
    encode(&ms, 256).unwrap()
}

fn message() -> String {
    unsafe { std::ffi::CStr::from_ptr(capi::moek_last_error_message()) }.to_string_lossy().into_owned()
}

fn parse(bytes: &[u8]) -> (sys::moek_status, sys::moek_subbit_weights) {
    let mut w = Compressed::parse(&buffer()).unwrap().descriptor().unwrap();
    w.matrices = -1;
    let status = unsafe { capi::moek_subbit_parse(bytes.as_ptr().cast(), bytes.len(), &mut w) };
    (status, w)
}

#[test]
fn parse_fills_the_descriptor_and_write_image_the_image() {
    let bytes = buffer();
    let (status, w) = parse(&bytes);
    assert_eq!(status, sys::moek_status_MOEK_SUCCESS, "{}", message());
    let view = Compressed::parse(&bytes).unwrap();
    let expected = view.descriptor().unwrap();
    assert_eq!(format!("{w:?}"), format!("{expected:?}"));
    assert_eq!((w.matrices, w.rows, w.cols, w.tile_cols, w.tiles_per_row), (2, 5, 700, 256, 3));
    assert!(w.image.is_null());
    for at in [w.dictionary_at, w.scales_at, w.offsets_at, w.codes_at, w.image_bytes] {
        assert_eq!(at % 16, 0, "sections start at multiples of 16 bytes");
    }
    let mut image = vec![0xffu8; w.image_bytes];
    let status = unsafe {
        capi::moek_subbit_write_image(bytes.as_ptr().cast(), bytes.len(), image.as_mut_ptr().cast(), image.len())
    };
    assert_eq!(status, sys::moek_status_MOEK_SUCCESS, "{}", message());
    assert_eq!(image, view.image().unwrap());
    // Dictionary entries: the phrases as nonzero and sign masks with an end marker, in the image's own
    // order (by use), so the image holds the same set of entries as the dictionary.
    let entries = w.dictionary_entries as usize;
    let mut got: Vec<u64> =
        (0..entries).map(|c| u64::from_le_bytes(image[8 * c..8 * c + 8].try_into().unwrap())).collect();
    let mut want: Vec<u64> = (0..entries)
        .map(|code| {
            let len = view.dictionary.lengths[code] as usize;
            let (mut nonzero, mut sign) = (0u32, 0u32);
            for j in 0..len {
                match view.dictionary.symbol(code, j) {
                    1 => nonzero |= 1 << j,
                    2 => (nonzero, sign) = (nonzero | 1 << j, sign | 1 << j),
                    _ => {}
                }
            }
            if len < 32 {
                sign |= 1 << len;
            }
            u64::from(nonzero) | u64::from(sign) << 32
        })
        .collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want, "the image's dictionary is not the buffer's phrases");

    let status = unsafe {
        capi::moek_subbit_write_image(bytes.as_ptr().cast(), bytes.len(), image.as_mut_ptr().cast(), image.len() - 1)
    };
    assert_eq!(status, sys::moek_status_MOEK_ERROR_BUFFER_TOO_SMALL, "{}", message());
}

#[test]
fn parse_refuses_null_and_corrupt_buffers() {
    let bytes = buffer();
    let mut w = Compressed::parse(&bytes).unwrap().descriptor().unwrap();
    let null = std::ptr::null::<c_void>();
    assert_eq!(unsafe { capi::moek_subbit_parse(null, 10, &mut w) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert!(message().contains("bytes"), "{}", message());
    let status = unsafe { capi::moek_subbit_parse(bytes.as_ptr().cast(), bytes.len(), std::ptr::null_mut()) };
    assert_eq!(status, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert!(message().contains("weights"), "{}", message());
    let (status, _) = parse(&bytes[..bytes.len() - 2]);
    assert_eq!(status, sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    assert!(message().contains("corrupt"), "{}", message());
    let mut bad = bytes.clone();
    bad[0] = b'X';
    assert_eq!(parse(&bad).0, sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    let mut image = vec![0u8; 16];
    let status =
        unsafe { capi::moek_subbit_write_image(bad.as_ptr().cast(), bad.len(), image.as_mut_ptr().cast(), 16) };
    assert_eq!(status, sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    let status = unsafe { capi::moek_subbit_write_image(bytes.as_ptr().cast(), bytes.len(), std::ptr::null_mut(), 16) };
    assert_eq!(status, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert!(message().contains("image"), "{}", message());
}

fn valid_matvec() -> sys::moek_subbit_matvec_args {
    let mut w = Compressed::parse(&buffer()).unwrap().descriptor().unwrap();
    w.image = 0x10000 as *const c_void;
    sys::moek_subbit_matvec_args {
        weights: w,
        matrix: 1,
        num_tokens: 3,
        expert_offsets: std::ptr::null(),
        x: 0x20000 as *const c_void,
        y: 0x30000 as *mut c_void,
        workspace: 0x40000 as *mut c_void,
        workspace_bytes: 4 * 3 * 3 * 5,
    }
}

#[test]
fn matvec_workspace_size_is_the_tiles_partial_sums() {
    let a = valid_matvec();
    let mut bytes = 0usize;
    assert_eq!(unsafe { capi::moek_subbit_matvec_workspace_size(&a, &mut bytes) }, sys::moek_status_MOEK_SUCCESS);
    assert_eq!(bytes, 4 * 3 * 3 * 5); // tiles x tokens x rows floats
    let grouped = sys::moek_subbit_matvec_args { expert_offsets: 0x50000 as *const i32, num_tokens: 40, ..a };
    assert_eq!(unsafe { capi::moek_subbit_matvec_workspace_size(&grouped, &mut bytes) }, sys::moek_status_MOEK_SUCCESS);
    assert_eq!(bytes, 4 * 3 * 40 * 5);
    let status = unsafe { capi::moek_subbit_matvec_workspace_size(&a, std::ptr::null_mut()) };
    assert_eq!(status, sys::moek_status_MOEK_ERROR_NULL_POINTER);
}

#[test]
fn c_interface_checks_subbit_arguments() {
    let stream = std::ptr::null_mut();
    assert_eq!(unsafe { capi::moek_subbit_matvec(std::ptr::null(), stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert_eq!(unsafe { capi::moek_subbit_decode(std::ptr::null(), stream) }, sys::moek_status_MOEK_ERROR_NULL_POINTER);

    type Edit = fn(&mut sys::moek_subbit_matvec_args);
    let cases: [(Edit, sys::moek_status, &str); 22] = [
        (|a| a.matrix = 2, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "matrix"),
        (|a| a.matrix = -1, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "matrix"),
        (|a| a.num_tokens = 0, sys::moek_status_MOEK_ERROR_INVALID_NUM_TOKENS, "num_tokens"),
        (|a| a.num_tokens = 9, sys::moek_status_MOEK_ERROR_INVALID_NUM_TOKENS, "num_tokens"),
        (
            |a| {
                a.expert_offsets = 0x50000 as *const i32;
                a.num_tokens = -1;
            },
            sys::moek_status_MOEK_ERROR_INVALID_NUM_TOKENS,
            "num_tokens",
        ),
        (|a| a.expert_offsets = 0x50002 as *const i32, sys::moek_status_MOEK_ERROR_MISALIGNED, "expert_offsets"),
        (|a| a.weights.image = std::ptr::null(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "image"),
        (|a| a.weights.image = 0x10008 as *const c_void, sys::moek_status_MOEK_ERROR_MISALIGNED, "image"),
        (|a| a.x = std::ptr::null(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "x"),
        (|a| a.x = 0x20001 as *const c_void, sys::moek_status_MOEK_ERROR_MISALIGNED, "x"),
        (|a| a.y = std::ptr::null_mut(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "y"),
        (|a| a.workspace_bytes -= 1, sys::moek_status_MOEK_ERROR_WORKSPACE_TOO_SMALL, "workspace_bytes"),
        (|a| a.workspace = std::ptr::null_mut(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "workspace"),
        (|a| a.workspace = 0x40004 as *mut c_void, sys::moek_status_MOEK_ERROR_MISALIGNED, "workspace"),
        (|a| a.weights.matrices = 0, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "matrices"),
        (|a| a.weights.rows = 50, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "offsets_at"),
        (|a| a.weights.cols = 1000, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "tiles_per_row"),
        (|a| a.weights.tile_cols = 300, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "tile_cols"),
        (|a| a.weights.dictionary_entries = 2, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "dictionary_entries"),
        (|a| a.weights.codes += 8, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "image_bytes"),
        (|a| a.weights.codes = -1, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "codes"),
        (|a| a.weights.offsets_at += 16, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "offsets_at"),
    ];
    for (i, (edit, status, name)) in cases.into_iter().enumerate() {
        let mut a = valid_matvec();
        edit(&mut a);
        assert_eq!(unsafe { capi::moek_subbit_matvec(&a, stream) }, status, "case {i}: {}", message());
        assert!(message().contains(name), "case {i}: '{}' does not name {name}", message());
    }

    let w = valid_matvec().weights;
    let decode = |edit: fn(&mut sys::moek_subbit_decode_args)| {
        let mut a = sys::moek_subbit_decode_args { weights: w, out: 0x60000 as *mut c_void };
        edit(&mut a);
        unsafe { capi::moek_subbit_decode(&a, stream) }
    };
    assert_eq!(decode(|a| a.out = std::ptr::null_mut()), sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert!(message().contains("out"), "{}", message());
    assert_eq!(decode(|a| a.out = 0x60001 as *mut c_void), sys::moek_status_MOEK_ERROR_MISALIGNED);
    assert_eq!(decode(|a| a.weights.image = std::ptr::null()), sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert_eq!(decode(|a| a.weights.scales_at = 0), sys::moek_status_MOEK_ERROR_INVALID_VALUE);
    assert!(message().contains("scales_at"), "{}", message());
}

/// Three tiles of 256 per row (C = 700), 2 matrices of 5 rows.
fn valid_gemm() -> sys::moek_subbit_grouped_gemm_args {
    let mut w = Compressed::parse(&buffer()).unwrap().descriptor().unwrap();
    w.image = 0x10000 as *const c_void;
    sys::moek_subbit_grouped_gemm_args {
        weights: w,
        num_rows: 40,
        expert_offsets: 0x50000 as *const i32,
        x: 0x20000 as *const c_void,
        row_scale: 0x70000 as *const f32,
        y: 0x30000 as *mut c_void,
        split_k: 3,
        workspace: 0x40000 as *mut c_void,
        workspace_bytes: 4 * 3 * 40 * 5,
    }
}

fn gemm_workspace(a: &sys::moek_subbit_grouped_gemm_args) -> (sys::moek_status, usize) {
    let mut bytes = usize::MAX;
    let status = unsafe { capi::moek_subbit_grouped_gemm_workspace_size(a, &mut bytes) };
    (status, bytes)
}

#[test]
fn grouped_gemm_workspace_is_the_slices_partial_products() {
    let a = valid_gemm();
    // An explicit split: 4 bytes x slices x rows x R.
    assert_eq!(gemm_workspace(&a), (sys::moek_status_MOEK_SUCCESS, 4 * 3 * 40 * 5));
    // More slices than tiles are lowered to the tiles; one slice needs none.
    assert_eq!(gemm_workspace(&sys::moek_subbit_grouped_gemm_args { split_k: 64, ..a }).1, 4 * 3 * 40 * 5);
    assert_eq!(gemm_workspace(&sys::moek_subbit_grouped_gemm_args { split_k: 2, ..a }).1, 4 * 2 * 40 * 5);
    assert_eq!(gemm_workspace(&sys::moek_subbit_grouped_gemm_args { split_k: 1, ..a }).1, 0);
    // Automatic: this tiny shape makes 2 blocks, so it takes all 3 tiles' slices; no rows, no workspace.
    assert_eq!(gemm_workspace(&sys::moek_subbit_grouped_gemm_args { split_k: 0, ..a }).1, 4 * 3 * 40 * 5);
    assert_eq!(gemm_workspace(&sys::moek_subbit_grouped_gemm_args { split_k: 0, num_rows: 0, ..a }).1, 0);
    // The query reads no pointer.
    let bare = sys::moek_subbit_grouped_gemm_args {
        expert_offsets: std::ptr::null(),
        x: std::ptr::null(),
        y: std::ptr::null_mut(),
        workspace: std::ptr::null_mut(),
        ..a
    };
    assert_eq!(gemm_workspace(&bare).0, sys::moek_status_MOEK_SUCCESS);
    let status = unsafe { capi::moek_subbit_grouped_gemm_workspace_size(&a, std::ptr::null_mut()) };
    assert_eq!(status, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    let status = unsafe { capi::moek_subbit_grouped_gemm_workspace_size(std::ptr::null(), &mut 0) };
    assert_eq!(status, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    let (status, _) = gemm_workspace(&sys::moek_subbit_grouped_gemm_args { num_rows: -1, ..a });
    assert_eq!(status, sys::moek_status_MOEK_ERROR_INVALID_NUM_TOKENS);
}

#[test]
fn c_interface_checks_subbit_grouped_gemm_arguments() {
    let stream = std::ptr::null_mut();
    let status = unsafe { capi::moek_subbit_grouped_gemm(std::ptr::null(), stream) };
    assert_eq!(status, sys::moek_status_MOEK_ERROR_NULL_POINTER);
    assert!(message().contains("args"), "{}", message());

    type Edit = fn(&mut sys::moek_subbit_grouped_gemm_args);
    let cases: [(Edit, sys::moek_status, &str); 24] = [
        (|a| a.num_rows = -1, sys::moek_status_MOEK_ERROR_INVALID_NUM_TOKENS, "num_rows"),
        (|a| a.num_rows = 1 << 31, sys::moek_status_MOEK_ERROR_INVALID_NUM_TOKENS, "num_rows"),
        (|a| a.split_k = -1, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "split_k"),
        (|a| a.split_k = 65, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "split_k"),
        (|a| a.expert_offsets = std::ptr::null(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "expert_offsets"),
        (|a| a.expert_offsets = 0x50002 as *const i32, sys::moek_status_MOEK_ERROR_MISALIGNED, "expert_offsets"),
        (|a| a.weights.image = std::ptr::null(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "image"),
        (|a| a.weights.image = 0x10008 as *const c_void, sys::moek_status_MOEK_ERROR_MISALIGNED, "image"),
        (|a| a.x = std::ptr::null(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "x"),
        (|a| a.x = 0x20001 as *const c_void, sys::moek_status_MOEK_ERROR_MISALIGNED, "x"),
        (|a| a.y = std::ptr::null_mut(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "y"),
        (|a| a.y = 0x30001 as *mut c_void, sys::moek_status_MOEK_ERROR_MISALIGNED, "y"),
        (|a| a.row_scale = 0x70002 as *const f32, sys::moek_status_MOEK_ERROR_MISALIGNED, "row_scale"),
        (|a| a.workspace_bytes -= 1, sys::moek_status_MOEK_ERROR_WORKSPACE_TOO_SMALL, "workspace_bytes"),
        (|a| a.workspace = std::ptr::null_mut(), sys::moek_status_MOEK_ERROR_NULL_POINTER, "workspace"),
        (|a| a.workspace = 0x40004 as *mut c_void, sys::moek_status_MOEK_ERROR_MISALIGNED, "workspace"),
        (|a| a.weights.matrices = 0, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "matrices"),
        (|a| a.weights.matrices = 8193, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "matrices"),
        (|a| a.weights.rows = 50, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "offsets_at"),
        (|a| a.weights.cols = 1000, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "tiles_per_row"),
        (|a| a.weights.tile_cols = 300, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "tile_cols"),
        (|a| a.weights.codes += 8, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "image_bytes"),
        (|a| a.weights.offsets_at += 16, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "offsets_at"),
        (|a| a.weights.dictionary_entries = 2, sys::moek_status_MOEK_ERROR_INVALID_VALUE, "dictionary_entries"),
    ];
    for (i, (edit, status, name)) in cases.into_iter().enumerate() {
        let mut a = valid_gemm();
        edit(&mut a);
        assert_eq!(unsafe { capi::moek_subbit_grouped_gemm(&a, stream) }, status, "case {i}: {}", message());
        assert!(message().contains(name), "case {i}: '{}' does not name {name}", message());
    }
}

/// What a call that passes every check does here: the launch fails without kernels or a GPU, but the
/// arguments were accepted (no status naming an argument). Covers the optional pointers: no row scale, no
/// workspace with the automatic split (which then does not split), and no x or y without rows.
#[test]
fn grouped_gemm_accepts_optional_pointers_left_out() {
    let accepted = |a: &sys::moek_subbit_grouped_gemm_args| {
        let status = unsafe { capi::moek_subbit_grouped_gemm(a, std::ptr::null_mut()) };
        let ok = [
            sys::moek_status_MOEK_SUCCESS,
            sys::moek_status_MOEK_ERROR_NO_CUDA_KERNELS,
            sys::moek_status_MOEK_ERROR_CUDA,
        ];
        assert!(ok.contains(&status), "status {status}: {}", message());
    };
    let a = valid_gemm();
    accepted(&a);
    accepted(&sys::moek_subbit_grouped_gemm_args { row_scale: std::ptr::null(), ..a });
    accepted(&sys::moek_subbit_grouped_gemm_args {
        split_k: 0,
        workspace: std::ptr::null_mut(),
        workspace_bytes: 0,
        ..a
    });
    accepted(&sys::moek_subbit_grouped_gemm_args { split_k: 1, workspace: std::ptr::null_mut(), ..a });
    accepted(&sys::moek_subbit_grouped_gemm_args {
        num_rows: 0,
        x: std::ptr::null(),
        y: std::ptr::null_mut(),
        split_k: 0,
        workspace: std::ptr::null_mut(),
        workspace_bytes: 0,
        ..a
    });
}
