//! Thin system calls aya 0.14 does not wrap: BPF_PROG_TEST_RUN, map-create probes, the
//! monotonic clock, and interface discovery. Every filesystem path the crate reads is here.

use std::{
    ffi::{CStr, CString},
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

pub(crate) const PROC_MOUNTS: &str = "/proc/mounts";
pub(crate) const PROC_SELF_MOUNTS: &str = "/proc/self/mounts";
pub(crate) const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
pub(crate) const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub(crate) const BPF_MAP_TYPE_RINGBUF: u32 = 27;
const IFF_UP: u32 = 0x1;

pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `union bpf_attr` as used by BPF_PROG_TEST_RUN (the `test` member).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// Result of one BPF_PROG_TEST_RUN.
pub(crate) struct RawTestRun {
    pub retval: u32,
    pub data_out: Vec<u8>,
    pub duration_ns: u32,
}

/// Runs `prog` once (or `repeat` times) on `data` without any NIC.
pub(crate) fn prog_test_run(
    prog: BorrowedFd<'_>,
    data: &[u8],
    repeat: u32,
) -> io::Result<RawTestRun> {
    // Room for everything a program could grow the packet to.
    let mut out = vec![0u8; data.len() + 4096];
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: data.len() as u32,
        data_size_out: out.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: attr points to a correctly laid out, fully initialised bpf_attr prefix whose
    // buffers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRunAttr,
            std::mem::size_of::<TestRunAttr>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(RawTestRun {
        retval: attr.retval,
        data_out: out,
        duration_ns: attr.duration,
    })
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// Creates (and closes again) a map, to learn whether the kernel allows it.
pub(crate) fn try_create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> io::Result<()> {
    let attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix for BPF_MAP_CREATE.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreateAttr,
            std::mem::size_of::<MapCreateAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

/// Names of the interfaces that are administratively up in the calling thread's network
/// namespace, sorted, `lo` included. (Netlink and ioctl, not /sys/class/net, which shows
/// the namespace sysfs was mounted in.)
pub(crate) fn interfaces_up() -> io::Result<Vec<String>> {
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    // SAFETY: walking the array up to its terminator; names are valid C strings.
    unsafe {
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            names.push(
                CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    // SAFETY: a plain datagram socket used only for SIOCGIFFLAGS, closed by OwnedFd.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd.
    let socket = unsafe { OwnedFd::from_raw_fd(socket) };
    names.retain(|name| {
        interface_flags(socket.as_raw_fd(), name).is_some_and(|flags| flags & IFF_UP != 0)
    });
    names.sort();
    names.dedup();
    Ok(names)
}

fn interface_flags(socket: libc::c_int, name: &str) -> Option<u32> {
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: ifreq is plain data; the name fits with its NUL; ioctl fills ifru_flags.
    unsafe {
        let mut request: libc::ifreq = std::mem::zeroed();
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *slot = byte as libc::c_char;
        }
        if libc::ioctl(socket, libc::SIOCGIFFLAGS, &mut request) != 0 {
            return None;
        }
        Some(request.ifr_ifru.ifru_flags as u16 as u32)
    }
}

pub(crate) fn ifindex(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

pub(crate) fn is_root() -> bool {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn bpffs_mounted() -> bool {
    std::fs::read_to_string(PROC_MOUNTS)
        .map(|mounts| {
            mounts
                .lines()
                .any(|line| line.split_whitespace().nth(2) == Some("bpf"))
        })
        .unwrap_or(false)
}

pub(crate) fn btf_present() -> bool {
    Path::new(BTF_VMLINUX).exists()
}

/// The running kernel's (major, minor) from uname.
pub(crate) fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: utsname is plain data, uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    let release: Vec<u8> = uts
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    let release = String::from_utf8_lossy(&release);
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Mounts a cgroup2 hierarchy at `target`.
pub(crate) fn mount_cgroup2(target: &Path) -> io::Result<()> {
    let target = path_cstring(target)?;
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            target.as_ptr(),
            c"cgroup2".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The filesystem magic (`f_type`) of the filesystem holding `path`.
pub(crate) fn statfs_type(path: &Path) -> io::Result<i64> {
    let path = path_cstring(path)?;
    // SAFETY: statfs is plain data, filled by the call.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    if unsafe { libc::statfs(path.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf.f_type as i64)
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lo_is_up_and_has_index_1_or_more() {
        let up = interfaces_up().unwrap();
        assert!(up.iter().any(|name| name == "lo"), "interfaces up: {up:?}");
        assert!(ifindex("lo").unwrap() >= 1);
        assert_eq!(ifindex("no-such-if0"), None);
    }

    #[test]
    fn kernel_version_parses() {
        let (major, _) = kernel_version().unwrap();
        assert!(major >= 3);
    }
}
