//! `BPF_PROG_TEST_RUN`: run a loaded program on a packet in the kernel, without a device.
//! aya has no wrapper for it, so this is the raw `bpf(2)` call with its documented attribute
//! layout (`union bpf_attr`, the `test` member).

use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// `union bpf_attr`'s `test` member (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestAttr {
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

/// What one test run returned.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The program's return value (for XDP: 2 = XDP_PASS).
    pub retval: u32,
    /// Mean time per run, in ns, as the kernel measured it.
    pub duration_ns: u32,
    /// The packet after the program, metadata in front for XDP.
    pub data: Vec<u8>,
}

pub const XDP_PASS: u32 = 2;

/// Run `program` on `packet` `repeat` times (at least once).
pub fn run(program: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> std::io::Result<Outcome> {
    // Room for what the program may add in front (metadata) or grow.
    let mut out = vec![0u8; packet.len() + 512];
    let mut attr = TestAttr {
        prog_fd: program.as_raw_fd() as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: repeat.max(1),
        ..TestAttr::default()
    };
    // SAFETY: attr points to a live TestAttr whose data pointers describe live buffers of the
    // given sizes; the kernel writes at most data_size_out bytes to data_out.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestAttr,
            std::mem::size_of::<TestAttr>(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    out.truncate(attr.data_size_out as usize);
    Ok(Outcome {
        retval: attr.retval,
        duration_ns: attr.duration,
        data: out,
    })
}
