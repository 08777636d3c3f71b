//! Thin RAII wrappers over the ggml C API (through `llama-cpp-sys-2`).
//!
//! Everything `unsafe` about ggml lives in this module, `model.rs`, `kv.rs`, `graph.rs` and
//! `session.rs`; pointers to tensors stay valid as long as the owning context lives.

use crate::error::{EngineError, Result};
use llama_cpp_sys_2 as sys;
use std::ffi::{CStr, CString};
use std::ptr::NonNull;

pub(crate) type Tensor = *mut sys::ggml_tensor;

/// A ggml context holding tensor metadata only (`no_alloc`), with room for `n_tensors` tensors
/// and optionally one graph of `graph_size` nodes.
pub(crate) struct GgmlCtx(NonNull<sys::ggml_context>);

impl GgmlCtx {
    pub(crate) fn new(n_tensors: usize, graph_size: usize) -> Result<Self> {
        // SAFETY: plain size queries.
        let mut mem = unsafe { sys::ggml_tensor_overhead() } * n_tensors;
        if graph_size > 0 {
            mem += unsafe { sys::ggml_graph_overhead_custom(graph_size, false) };
        }
        let params = sys::ggml_init_params {
            mem_size: mem,
            mem_buffer: std::ptr::null_mut(),
            no_alloc: true,
        };
        // SAFETY: ggml_init copies the params; returns NULL on failure.
        let p = unsafe { sys::ggml_init(params) };
        NonNull::new(p)
            .map(GgmlCtx)
            .ok_or_else(|| EngineError::Ggml("ggml_init failed".into()))
    }

    /// Wraps a context created elsewhere (e.g. by gguf_init_from_file); takes ownership.
    pub(crate) fn from_raw(p: *mut sys::ggml_context) -> Option<Self> {
        NonNull::new(p).map(GgmlCtx)
    }

    pub(crate) fn ptr(&self) -> *mut sys::ggml_context {
        self.0.as_ptr()
    }
}

impl Drop for GgmlCtx {
    fn drop(&mut self) {
        // SAFETY: we own the context.
        unsafe { sys::ggml_free(self.0.as_ptr()) }
    }
}

/// A backend buffer (weights, KV cache, persistent activations).
pub(crate) struct Buffer(NonNull<sys::ggml_backend_buffer>);

impl Buffer {
    /// Allocates every tensor of `ctx` in one buffer of type `buft`.
    pub(crate) fn alloc_ctx_tensors(
        ctx: &GgmlCtx,
        buft: sys::ggml_backend_buffer_type_t,
    ) -> Result<Self> {
        // SAFETY: ctx is a live no_alloc context, buft a valid buffer type.
        let b = unsafe { sys::ggml_backend_alloc_ctx_tensors_from_buft(ctx.ptr(), buft) };
        NonNull::new(b).map(Buffer).ok_or_else(|| {
            EngineError::Ggml(format!("could not allocate a {} buffer", buft_name(buft)))
        })
    }

    /// Takes ownership of a buffer made elsewhere.
    pub(crate) fn from_raw(b: sys::ggml_backend_buffer_t) -> Option<Self> {
        NonNull::new(b).map(Buffer)
    }

    pub(crate) fn ptr(&self) -> sys::ggml_backend_buffer_t {
        self.0.as_ptr()
    }

    pub(crate) fn clear(&self, value: u8) {
        // SAFETY: live buffer.
        unsafe { sys::ggml_backend_buffer_clear(self.ptr(), value) }
    }

    pub(crate) fn size(&self) -> usize {
        // SAFETY: live buffer.
        unsafe { sys::ggml_backend_buffer_get_size(self.ptr()) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: we own the buffer.
        unsafe { sys::ggml_backend_buffer_free(self.0.as_ptr()) }
    }
}

// SAFETY: buffers and contexts are plain memory owned by one value; ggml has no thread
// affinity for them. Concurrent mutation is prevented by the owners' &mut APIs.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}
unsafe impl Send for GgmlCtx {}
unsafe impl Sync for GgmlCtx {}

/// An initialised backend (one per session and device).
pub(crate) struct Backend(NonNull<sys::ggml_backend>);

impl Backend {
    pub(crate) fn init(dev: sys::ggml_backend_dev_t) -> Result<Self> {
        // SAFETY: dev comes from the device registry.
        let b = unsafe { sys::ggml_backend_dev_init(dev, std::ptr::null()) };
        NonNull::new(b)
            .map(Backend)
            .ok_or_else(|| EngineError::Ggml(format!("could not start backend {}", dev_name(dev))))
    }
    pub(crate) fn ptr(&self) -> sys::ggml_backend_t {
        self.0.as_ptr()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // SAFETY: we own the backend.
        unsafe { sys::ggml_backend_free(self.0.as_ptr()) }
    }
}

unsafe impl Send for Backend {}

/// A backend scheduler.
pub(crate) struct Sched(NonNull<sys::ggml_backend_sched>);

impl Sched {
    pub(crate) fn new(
        backends: &[sys::ggml_backend_t],
        bufts: &[sys::ggml_backend_buffer_type_t],
        graph_size: usize,
    ) -> Result<Self> {
        let mut be = backends.to_vec();
        let mut bt = bufts.to_vec();
        // SAFETY: arrays of equal length, valid backends; the scheduler copies them.
        let s = unsafe {
            sys::ggml_backend_sched_new(
                be.as_mut_ptr(),
                bt.as_mut_ptr(),
                be.len() as i32,
                graph_size,
                false,
                true,
            )
        };
        NonNull::new(s)
            .map(Sched)
            .ok_or_else(|| EngineError::Ggml("ggml_backend_sched_new failed".into()))
    }
    pub(crate) fn ptr(&self) -> sys::ggml_backend_sched_t {
        self.0.as_ptr()
    }
}

impl Drop for Sched {
    fn drop(&mut self) {
        // SAFETY: we own the scheduler.
        unsafe { sys::ggml_backend_sched_free(self.0.as_ptr()) }
    }
}

unsafe impl Send for Sched {}

pub(crate) fn buft_name(buft: sys::ggml_backend_buffer_type_t) -> String {
    // SAFETY: returns a static C string.
    unsafe { cstr(sys::ggml_backend_buft_name(buft)) }
}

pub(crate) fn dev_name(dev: sys::ggml_backend_dev_t) -> String {
    // SAFETY: returns a static C string.
    unsafe { cstr(sys::ggml_backend_dev_name(dev)) }
}

pub(crate) fn dev_description(dev: sys::ggml_backend_dev_t) -> String {
    // SAFETY: returns a static C string.
    unsafe { cstr(sys::ggml_backend_dev_description(dev)) }
}

unsafe fn cstr(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    CStr::from_ptr(p).to_string_lossy().into_owned()
}

pub(crate) fn set_name(t: Tensor, name: &str) {
    if let Ok(c) = CString::new(name) {
        // SAFETY: t is a live tensor; ggml copies at most 63 bytes.
        unsafe {
            sys::ggml_set_name(t, c.as_ptr());
        }
    }
}

/// Copies host bytes into a tensor wherever it lives.
pub(crate) fn tensor_set<T: Copy>(t: Tensor, data: &[T]) {
    let bytes = std::mem::size_of_val(data);
    // SAFETY: callers pass a slice of exactly ggml_nbytes(t) bytes (checked in debug builds).
    unsafe {
        debug_assert_eq!(bytes, sys::ggml_nbytes(t));
        sys::ggml_backend_tensor_set(t, data.as_ptr().cast(), 0, bytes);
    }
}

/// Writes the first bytes of a tensor.
pub(crate) fn tensor_set_bytes(t: Tensor, data: &[u8]) {
    // SAFETY: callers pass at most ggml_nbytes(t) bytes (checked in debug builds).
    unsafe {
        debug_assert!(data.len() <= sys::ggml_nbytes(t));
        sys::ggml_backend_tensor_set(t, data.as_ptr().cast(), 0, data.len());
    }
}

/// Bytes of one row (`ne[0]` elements) of a tensor.
pub(crate) fn row_bytes(t: Tensor) -> usize {
    // SAFETY: plain size query on a live tensor.
    unsafe { sys::ggml_row_size((*t).type_, (*t).ne[0]) }
}

/// Reads the first `n` bytes of a tensor.
pub(crate) fn tensor_get_bytes(t: Tensor, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    // SAFETY: callers ask for at most ggml_nbytes(t) bytes (checked in debug builds).
    unsafe {
        debug_assert!(n <= sys::ggml_nbytes(t));
        sys::ggml_backend_tensor_get(t, out.as_mut_ptr().cast(), 0, n);
    }
    out
}

/// Reads a tensor into a host vector of f32.
pub(crate) fn tensor_get_f32(t: Tensor, out: &mut Vec<f32>) {
    // SAFETY: t is an allocated F32 tensor; we size the destination from it.
    unsafe {
        let n = sys::ggml_nbytes(t) / 4;
        out.resize(n, 0.0);
        sys::ggml_backend_tensor_get(t, out.as_mut_ptr().cast(), 0, n * 4);
    }
}

/// All ggml devices in the registry: (device, type).
pub(crate) fn devices() -> Vec<(sys::ggml_backend_dev_t, sys::ggml_backend_dev_type)> {
    // SAFETY: registry queries.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| {
                let d = sys::ggml_backend_dev_get(i);
                (d, sys::ggml_backend_dev_type(d))
            })
            .collect()
    }
}

/// The CPU device.
pub(crate) fn cpu_device() -> Result<sys::ggml_backend_dev_t> {
    // SAFETY: registry query.
    let d = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
    if d.is_null() {
        Err(EngineError::Ggml("no CPU backend registered".into()))
    } else {
        Ok(d)
    }
}

/// Sets the thread count of a backend if it has threads (CPU, BLAS ...).
pub(crate) fn set_n_threads(backend: sys::ggml_backend_t, dev: sys::ggml_backend_dev_t, n: usize) {
    // SAFETY: looks up an optional function pointer of the backend's registry.
    unsafe {
        let reg = sys::ggml_backend_dev_backend_reg(dev);
        if reg.is_null() {
            return;
        }
        let name = c"ggml_backend_set_n_threads";
        let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
        if !f.is_null() {
            let f: unsafe extern "C" fn(sys::ggml_backend_t, std::os::raw::c_int) =
                std::mem::transmute(f);
            f(backend, n as std::os::raw::c_int);
        }
    }
}

/// The CPU's "extra" buffer types (repacked weight layouts), as llama.cpp uses them.
pub(crate) fn cpu_extra_bufts(
    cpu: sys::ggml_backend_dev_t,
) -> Vec<sys::ggml_backend_buffer_type_t> {
    let mut out = Vec::new();
    // SAFETY: optional registry function returning a NULL-terminated array.
    unsafe {
        let reg = sys::ggml_backend_dev_backend_reg(cpu);
        if reg.is_null() {
            return out;
        }
        let name = c"ggml_backend_dev_get_extra_bufts";
        let f = sys::ggml_backend_reg_get_proc_address(reg, name.as_ptr());
        if f.is_null() {
            return out;
        }
        let f: unsafe extern "C" fn(
            sys::ggml_backend_dev_t,
        ) -> *mut sys::ggml_backend_buffer_type_t = std::mem::transmute(f);
        let mut p = f(cpu);
        while !p.is_null() && !(*p).is_null() {
            out.push(*p);
            p = p.add(1);
        }
    }
    out
}
