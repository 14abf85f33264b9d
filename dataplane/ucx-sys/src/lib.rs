//! Hand-written bindings to the part of UCP (UCX's protocol layer) that llumlet's UCX transport
//! uses: context, worker (address, progress, wakeup), endpoint, memory registration, remote
//! keys, `ucp_put_nbx` and flush. They link the system UCX found through pkg-config (Debian's
//! `libucx-dev`). The struct layouts and the constants are checked against the installed
//! headers by this crate's tests (`src/layout.c` reports what the C compiler sees), so a UCX
//! whose ABI differs fails `cargo test` instead of corrupting memory. Safe use is in
//! `llumlet_dataplane::ucx`.
#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `ucs_status_t`.
pub type ucs_status_t = i8;
/// `ucs_status_ptr_t`: null (done), an error code, or a request handle.
pub type ucs_status_ptr_t = *mut c_void;

/// Opaque handles.
#[repr(C)]
pub struct ucp_context {
    _p: [u8; 0],
}
/// Opaque handles.
#[repr(C)]
pub struct ucp_worker {
    _p: [u8; 0],
}
/// Opaque handles.
#[repr(C)]
pub struct ucp_ep {
    _p: [u8; 0],
}
/// Opaque handles.
#[repr(C)]
pub struct ucp_mem {
    _p: [u8; 0],
}
/// Opaque handles.
#[repr(C)]
pub struct ucp_rkey {
    _p: [u8; 0],
}
/// Opaque handles.
#[repr(C)]
pub struct ucp_config {
    _p: [u8; 0],
}
/// Opaque handles.
#[repr(C)]
pub struct ucp_address {
    _p: [u8; 0],
}

/// `ucp_context_h`.
pub type ucp_context_h = *mut ucp_context;
/// `ucp_worker_h`.
pub type ucp_worker_h = *mut ucp_worker;
/// `ucp_ep_h`.
pub type ucp_ep_h = *mut ucp_ep;
/// `ucp_mem_h`.
pub type ucp_mem_h = *mut ucp_mem;
/// `ucp_rkey_h`.
pub type ucp_rkey_h = *mut ucp_rkey;

/// `ucp_params_t`.
#[repr(C)]
pub struct ucp_params_t {
    pub field_mask: u64,
    pub features: u64,
    pub request_size: usize,
    pub request_init: Option<unsafe extern "C" fn(*mut c_void)>,
    pub request_cleanup: Option<unsafe extern "C" fn(*mut c_void)>,
    pub tag_sender_mask: u64,
    pub mt_workers_shared: c_int,
    pub estimated_num_eps: usize,
    pub estimated_num_ppn: usize,
    pub name: *const c_char,
}

/// `ucp_worker_params_t`.
#[repr(C)]
pub struct ucp_worker_params_t {
    pub field_mask: u64,
    pub thread_mode: c_uint,
    /// `ucs_cpu_set_t`: 1024 bits.
    pub cpu_mask: [u64; 16],
    pub events: c_uint,
    pub user_data: *mut c_void,
    pub event_fd: c_int,
    pub flags: u64,
    pub name: *const c_char,
    pub am_alignment: usize,
    pub client_id: u64,
}

/// `ucp_err_handler_t`.
#[repr(C)]
pub struct ucp_err_handler_t {
    pub cb: Option<unsafe extern "C" fn(*mut c_void, ucp_ep_h, ucs_status_t)>,
    pub arg: *mut c_void,
}

/// `ucs_sock_addr_t`.
#[repr(C)]
pub struct ucs_sock_addr_t {
    pub addr: *const c_void,
    pub addrlen: u32,
}

/// `ucp_ep_params_t`.
#[repr(C)]
pub struct ucp_ep_params_t {
    pub field_mask: u64,
    pub address: *const ucp_address,
    pub err_mode: c_uint,
    pub err_handler: ucp_err_handler_t,
    pub user_data: *mut c_void,
    pub flags: c_uint,
    pub sockaddr: ucs_sock_addr_t,
    pub conn_request: *mut c_void,
    pub name: *const c_char,
    pub local_sockaddr: ucs_sock_addr_t,
}

/// `ucp_mem_map_params_t`.
#[repr(C)]
pub struct ucp_mem_map_params_t {
    pub field_mask: u64,
    pub address: *mut c_void,
    pub length: usize,
    pub flags: c_uint,
    pub prot: c_uint,
    pub memory_type: c_uint,
}

/// `ucp_request_param_t` (the callback and receive-info unions as one pointer each).
#[repr(C)]
pub struct ucp_request_param_t {
    pub op_attr_mask: u32,
    pub flags: u32,
    pub request: *mut c_void,
    pub cb: Option<unsafe extern "C" fn(*mut c_void, ucs_status_t, *mut c_void)>,
    pub datatype: u64,
    pub user_data: *mut c_void,
    pub reply_buffer: *mut c_void,
    pub memory_type: c_uint,
    pub recv_info: *mut c_void,
    pub memh: ucp_mem_h,
}

// Constants (checked against the headers by the tests).
pub const UCP_API_MAJOR: c_uint = 1;
pub const UCP_PARAM_FIELD_FEATURES: u64 = 1 << 0;
pub const UCP_PARAM_FIELD_MT_WORKERS_SHARED: u64 = 1 << 5;
pub const UCP_PARAM_FIELD_NAME: u64 = 1 << 8;
pub const UCP_FEATURE_RMA: u64 = 1 << 1;
pub const UCP_FEATURE_WAKEUP: u64 = 1 << 4;
pub const UCP_WORKER_PARAM_FIELD_THREAD_MODE: u64 = 1 << 0;
pub const UCP_WORKER_PARAM_FIELD_EVENTS: u64 = 1 << 2;
pub const UCP_WORKER_PARAM_FIELD_NAME: u64 = 1 << 6;
pub const UCP_WAKEUP_RMA: c_uint = 1 << 0;
pub const UCP_WAKEUP_TX: c_uint = 1 << 10;
pub const UCP_WAKEUP_RX: c_uint = 1 << 11;
pub const UCS_THREAD_MODE_SINGLE: c_uint = 0;
pub const UCP_EP_PARAM_FIELD_REMOTE_ADDRESS: u64 = 1 << 0;
pub const UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE: u64 = 1 << 1;
pub const UCP_EP_PARAM_FIELD_ERR_HANDLER: u64 = 1 << 2;
pub const UCP_ERR_HANDLING_MODE_NONE: c_uint = 0;
pub const UCP_ERR_HANDLING_MODE_PEER: c_uint = 1;
pub const UCP_MEM_MAP_PARAM_FIELD_ADDRESS: u64 = 1 << 0;
pub const UCP_MEM_MAP_PARAM_FIELD_LENGTH: u64 = 1 << 1;
pub const UCP_OP_ATTR_FIELD_CALLBACK: u32 = 1 << 1;
pub const UCP_OP_ATTR_FIELD_USER_DATA: u32 = 1 << 2;
pub const UCP_OP_ATTR_FIELD_FLAGS: u32 = 1 << 4;
pub const UCP_OP_ATTR_FIELD_MEMH: u32 = 1 << 8;
pub const UCP_EP_CLOSE_FLAG_FORCE: u32 = 1 << 0;
pub const UCS_OK: ucs_status_t = 0;
pub const UCS_INPROGRESS: ucs_status_t = 1;
pub const UCS_ERR_BUSY: ucs_status_t = -15;
pub const UCS_ERR_UNREACHABLE: ucs_status_t = -6;
pub const UCS_ERR_LAST: isize = -100;

/// `UCS_PTR_IS_ERR`.
pub fn ucs_ptr_is_err(p: ucs_status_ptr_t) -> bool {
    p as usize >= UCS_ERR_LAST as usize
}

/// `UCS_PTR_IS_PTR`.
pub fn ucs_ptr_is_ptr(p: ucs_status_ptr_t) -> bool {
    (p as usize).wrapping_sub(1) < (UCS_ERR_LAST as usize).wrapping_sub(1)
}

/// `UCS_PTR_STATUS`.
pub fn ucs_ptr_status(p: ucs_status_ptr_t) -> ucs_status_t {
    if ucs_ptr_is_ptr(p) {
        UCS_INPROGRESS
    } else {
        p as isize as ucs_status_t
    }
}

// Linked by build.rs from pkg-config (`-lucp -luct -lucs -lucm`).
extern "C" {
    pub fn ucp_config_read(
        env_prefix: *const c_char,
        filename: *const c_char,
        config_p: *mut *mut ucp_config,
    ) -> ucs_status_t;
    pub fn ucp_config_release(config: *mut ucp_config);
    pub fn ucp_config_modify(
        config: *mut ucp_config,
        name: *const c_char,
        value: *const c_char,
    ) -> ucs_status_t;
    pub fn ucp_init_version(
        api_major_version: c_uint,
        api_minor_version: c_uint,
        params: *const ucp_params_t,
        config: *const ucp_config,
        context_p: *mut ucp_context_h,
    ) -> ucs_status_t;
    pub fn ucp_cleanup(context: ucp_context_h);
    pub fn ucp_get_version(major: *mut c_uint, minor: *mut c_uint, release: *mut c_uint);

    pub fn ucp_worker_create(
        context: ucp_context_h,
        params: *const ucp_worker_params_t,
        worker_p: *mut ucp_worker_h,
    ) -> ucs_status_t;
    pub fn ucp_worker_destroy(worker: ucp_worker_h);
    pub fn ucp_worker_get_address(
        worker: ucp_worker_h,
        address_p: *mut *mut ucp_address,
        address_length_p: *mut usize,
    ) -> ucs_status_t;
    pub fn ucp_worker_release_address(worker: ucp_worker_h, address: *mut ucp_address);
    pub fn ucp_worker_progress(worker: ucp_worker_h) -> c_uint;
    pub fn ucp_worker_get_efd(worker: ucp_worker_h, fd: *mut c_int) -> ucs_status_t;
    pub fn ucp_worker_arm(worker: ucp_worker_h) -> ucs_status_t;
    pub fn ucp_worker_signal(worker: ucp_worker_h) -> ucs_status_t;

    pub fn ucp_ep_create(
        worker: ucp_worker_h,
        params: *const ucp_ep_params_t,
        ep_p: *mut ucp_ep_h,
    ) -> ucs_status_t;
    pub fn ucp_ep_close_nbx(ep: ucp_ep_h, param: *const ucp_request_param_t) -> ucs_status_ptr_t;
    pub fn ucp_ep_flush_nbx(ep: ucp_ep_h, param: *const ucp_request_param_t) -> ucs_status_ptr_t;

    pub fn ucp_mem_map(
        context: ucp_context_h,
        params: *const ucp_mem_map_params_t,
        memh_p: *mut ucp_mem_h,
    ) -> ucs_status_t;
    pub fn ucp_mem_unmap(context: ucp_context_h, memh: ucp_mem_h) -> ucs_status_t;
    pub fn ucp_rkey_pack(
        context: ucp_context_h,
        memh: ucp_mem_h,
        rkey_buffer_p: *mut *mut c_void,
        size_p: *mut usize,
    ) -> ucs_status_t;
    pub fn ucp_rkey_buffer_release(rkey_buffer: *mut c_void);
    pub fn ucp_ep_rkey_unpack(
        ep: ucp_ep_h,
        rkey_buffer: *const c_void,
        rkey_p: *mut ucp_rkey_h,
    ) -> ucs_status_t;
    pub fn ucp_rkey_destroy(rkey: ucp_rkey_h);

    pub fn ucp_put_nbx(
        ep: ucp_ep_h,
        buffer: *const c_void,
        count: usize,
        remote_addr: u64,
        rkey: ucp_rkey_h,
        param: *const ucp_request_param_t,
    ) -> ucs_status_ptr_t;
    pub fn ucp_request_check_status(request: *mut c_void) -> ucs_status_t;
    pub fn ucp_request_cancel(worker: ucp_worker_h, request: *mut c_void);
    pub fn ucp_request_free(request: *mut c_void);

    pub fn ucs_status_string(status: ucs_status_t) -> *const c_char;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    extern "C" {
        fn ucx_sys_layout(i: u32) -> u64;
    }

    #[test]
    fn layouts_and_constants_match_the_installed_headers() {
        let ours: &[(&str, u64)] = &[
            ("sizeof ucp_params_t", size_of::<ucp_params_t>() as u64),
            (
                "ucp_params_t.features",
                offset_of!(ucp_params_t, features) as u64,
            ),
            (
                "ucp_params_t.mt_workers_shared",
                offset_of!(ucp_params_t, mt_workers_shared) as u64,
            ),
            ("ucp_params_t.name", offset_of!(ucp_params_t, name) as u64),
            (
                "sizeof ucp_worker_params_t",
                size_of::<ucp_worker_params_t>() as u64,
            ),
            (
                "ucp_worker_params_t.thread_mode",
                offset_of!(ucp_worker_params_t, thread_mode) as u64,
            ),
            (
                "ucp_worker_params_t.events",
                offset_of!(ucp_worker_params_t, events) as u64,
            ),
            (
                "ucp_worker_params_t.name",
                offset_of!(ucp_worker_params_t, name) as u64,
            ),
            (
                "sizeof ucp_ep_params_t",
                size_of::<ucp_ep_params_t>() as u64,
            ),
            (
                "ucp_ep_params_t.address",
                offset_of!(ucp_ep_params_t, address) as u64,
            ),
            (
                "ucp_ep_params_t.err_mode",
                offset_of!(ucp_ep_params_t, err_mode) as u64,
            ),
            (
                "ucp_ep_params_t.err_handler",
                offset_of!(ucp_ep_params_t, err_handler) as u64,
            ),
            (
                "ucp_ep_params_t.name",
                offset_of!(ucp_ep_params_t, name) as u64,
            ),
            (
                "sizeof ucp_mem_map_params_t",
                size_of::<ucp_mem_map_params_t>() as u64,
            ),
            (
                "ucp_mem_map_params_t.address",
                offset_of!(ucp_mem_map_params_t, address) as u64,
            ),
            (
                "ucp_mem_map_params_t.length",
                offset_of!(ucp_mem_map_params_t, length) as u64,
            ),
            (
                "ucp_mem_map_params_t.flags",
                offset_of!(ucp_mem_map_params_t, flags) as u64,
            ),
            (
                "ucp_mem_map_params_t.memory_type",
                offset_of!(ucp_mem_map_params_t, memory_type) as u64,
            ),
            (
                "sizeof ucp_request_param_t",
                size_of::<ucp_request_param_t>() as u64,
            ),
            (
                "ucp_request_param_t.flags",
                offset_of!(ucp_request_param_t, flags) as u64,
            ),
            (
                "ucp_request_param_t.cb",
                offset_of!(ucp_request_param_t, cb) as u64,
            ),
            (
                "ucp_request_param_t.datatype",
                offset_of!(ucp_request_param_t, datatype) as u64,
            ),
            (
                "ucp_request_param_t.memh",
                offset_of!(ucp_request_param_t, memh) as u64,
            ),
            ("UCP_PARAM_FIELD_FEATURES", UCP_PARAM_FIELD_FEATURES),
            (
                "UCP_PARAM_FIELD_MT_WORKERS_SHARED",
                UCP_PARAM_FIELD_MT_WORKERS_SHARED,
            ),
            ("UCP_PARAM_FIELD_NAME", UCP_PARAM_FIELD_NAME),
            ("UCP_FEATURE_RMA", UCP_FEATURE_RMA),
            ("UCP_FEATURE_WAKEUP", UCP_FEATURE_WAKEUP),
            (
                "UCP_WORKER_PARAM_FIELD_THREAD_MODE",
                UCP_WORKER_PARAM_FIELD_THREAD_MODE,
            ),
            (
                "UCP_WORKER_PARAM_FIELD_EVENTS",
                UCP_WORKER_PARAM_FIELD_EVENTS,
            ),
            ("UCP_WORKER_PARAM_FIELD_NAME", UCP_WORKER_PARAM_FIELD_NAME),
            ("UCP_WAKEUP_RMA", u64::from(UCP_WAKEUP_RMA)),
            ("UCP_WAKEUP_TX", u64::from(UCP_WAKEUP_TX)),
            ("UCS_THREAD_MODE_SINGLE", u64::from(UCS_THREAD_MODE_SINGLE)),
            (
                "UCP_EP_PARAM_FIELD_REMOTE_ADDRESS",
                UCP_EP_PARAM_FIELD_REMOTE_ADDRESS,
            ),
            (
                "UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE",
                UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE,
            ),
            (
                "UCP_EP_PARAM_FIELD_ERR_HANDLER",
                UCP_EP_PARAM_FIELD_ERR_HANDLER,
            ),
            (
                "UCP_ERR_HANDLING_MODE_PEER",
                u64::from(UCP_ERR_HANDLING_MODE_PEER),
            ),
            (
                "UCP_MEM_MAP_PARAM_FIELD_ADDRESS",
                UCP_MEM_MAP_PARAM_FIELD_ADDRESS,
            ),
            (
                "UCP_MEM_MAP_PARAM_FIELD_LENGTH",
                UCP_MEM_MAP_PARAM_FIELD_LENGTH,
            ),
            (
                "UCP_OP_ATTR_FIELD_FLAGS",
                u64::from(UCP_OP_ATTR_FIELD_FLAGS),
            ),
            ("UCP_OP_ATTR_FIELD_MEMH", u64::from(UCP_OP_ATTR_FIELD_MEMH)),
            (
                "UCP_EP_CLOSE_FLAG_FORCE",
                u64::from(UCP_EP_CLOSE_FLAG_FORCE),
            ),
            ("UCP_API_MAJOR", u64::from(UCP_API_MAJOR)),
            ("UCP_API_MINOR (any; read below)", 0),
            ("UCS_ERR_LAST", UCS_ERR_LAST as i64 as u64),
            ("UCS_INPROGRESS", UCS_INPROGRESS as i64 as u64),
            ("UCS_ERR_BUSY", UCS_ERR_BUSY as i64 as u64),
            (
                "UCP_OP_ATTR_FIELD_CALLBACK",
                u64::from(UCP_OP_ATTR_FIELD_CALLBACK),
            ),
            (
                "UCP_OP_ATTR_FIELD_USER_DATA",
                u64::from(UCP_OP_ATTR_FIELD_USER_DATA),
            ),
            (
                "UCP_ERR_HANDLING_MODE_NONE",
                u64::from(UCP_ERR_HANDLING_MODE_NONE),
            ),
            ("UCS_ERR_UNREACHABLE", UCS_ERR_UNREACHABLE as i64 as u64),
            ("UCP_WAKEUP_RX", u64::from(UCP_WAKEUP_RX)),
        ];
        for (i, (what, v)) in ours.iter().enumerate() {
            // SAFETY: a pure function of its argument, compiled from src/layout.c.
            let theirs = unsafe { ucx_sys_layout(i as u32) };
            if what.starts_with("UCP_API_MINOR") {
                assert!(theirs >= 12, "UCX API 1.{theirs} is older than 1.12");
                continue;
            }
            assert_eq!(*v, theirs, "{what}: binding {v}, headers {theirs}");
        }
        assert_eq!(
            // SAFETY: as above.
            unsafe { ucx_sys_layout(ours.len() as u32) },
            u64::MAX,
            "table length"
        );
    }

    #[test]
    fn status_pointer_helpers() {
        assert!(!ucs_ptr_is_err(std::ptr::null_mut()));
        assert!(!ucs_ptr_is_ptr(std::ptr::null_mut()));
        let err = UCS_ERR_BUSY as isize as ucs_status_ptr_t;
        assert!(ucs_ptr_is_err(err) && !ucs_ptr_is_ptr(err));
        assert_eq!(ucs_ptr_status(err), UCS_ERR_BUSY);
        let req = 0x1000usize as ucs_status_ptr_t;
        assert!(ucs_ptr_is_ptr(req) && !ucs_ptr_is_err(req));
        assert_eq!(ucs_ptr_status(req), UCS_INPROGRESS);
    }
}
