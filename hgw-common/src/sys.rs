//! The bpf(2) commands hgw issues itself, which aya 0.14 does not expose: one syscall
//! wrapper and the small commands built on it, shared by the loader (module BTF), the
//! agent's pin handling and its tc scanner.

use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::Path;

pub const BPF_OBJ_GET: libc::c_long = 7;
pub const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub const BPF_PROG_QUERY: libc::c_long = 16;
pub const BPF_BTF_GET_FD_BY_ID: libc::c_long = 19;
pub const BPF_BTF_GET_NEXT_ID: libc::c_long = 23;
pub const BPF_LINK_DETACH: libc::c_long = 34;

/// bpf(2) with `attr` as the command's part of `union bpf_attr` (the kernel zero-fills
/// the rest); returns the syscall's non-negative result.
///
/// # Safety
/// `attr` must be laid out as `cmd`'s attributes, and every pointer in it must be valid
/// for what the kernel reads or writes there during the call.
pub unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i32> {
    // SAFETY: the caller vouches for attr's layout and pointers; its size is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    i32::try_from(rc).map_err(std::io::Error::other)
}

/// A new fd of the BPF object pinned at `path` (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut attr = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: BPF_OBJ_GET's layout; the path outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr)? };
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The object's info (`struct bpf_prog_info`, `bpf_link_info`, `bpf_btf_info`, ... as
/// `T`, up to its size) by BPF_OBJ_GET_INFO_BY_FD.
///
/// # Safety
/// `T` must be a prefix of the info struct of `fd`'s object type, and any pointers in
/// `info` valid for what the kernel writes through them.
pub unsafe fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> std::io::Result<()> {
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: std::ptr::from_mut(info) as u64,
    };
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD's layout; `info` is as long as `info_len` says.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop) }
}

/// Detaches the link `fd` from its hook at once (BPF_LINK_DETACH), without waiting
/// for its last reference to go.
pub fn link_detach(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let mut attr = [fd.as_raw_fd() as u32, 0];
    // SAFETY: BPF_LINK_DETACH's layout: the link fd, open for the call.
    unsafe { bpf(BPF_LINK_DETACH, &mut attr).map(drop) }
}
