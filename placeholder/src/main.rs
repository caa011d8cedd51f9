//! The VM Pod's container. It holds the VM's place in Kubernetes (requests, volumes,
//! network namespace) while QEMU runs under the node's libvirtd, so it does nothing but
//! wait to be stopped: it blocks SIGTERM and SIGINT, waits for one of them and exits 0.
//! As PID 1 of its container a process without handlers would ignore SIGTERM; waiting for
//! the signal synchronously needs none. Linux x86-64 system calls, no libc.
#![no_std]
#![no_main]

use core::arch::{asm, naked_asm};

const SYS_RT_SIGPROCMASK: usize = 14;
const SYS_RT_SIGTIMEDWAIT: usize = 128;
const SYS_EXIT_GROUP: usize = 231;
const SIG_BLOCK: usize = 0;
const SIGINT: usize = 2;
const SIGTERM: usize = 15;
/// The kernel's sigset_t, in bytes.
const SIGSET_SIZE: usize = 8;

/// A system call with up to four arguments; its return value (negative: -errno).
///
/// # Safety
/// The arguments must be what system call `n` expects (pointers valid for it).
unsafe fn syscall4(n: usize, a: usize, b: usize, c: usize, d: usize) -> isize {
    let ret: isize;
    // SAFETY: the x86-64 Linux system call convention; rcx and r11 are clobbered by
    // `syscall`, and the call touches no stack.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// Ends the process with `code`.
fn exit(code: usize) -> ! {
    // SAFETY: exit_group takes a status and never returns.
    unsafe {
        asm!("syscall", in("rax") SYS_EXIT_GROUP, in("rdi") code, options(noreturn, nostack));
    }
}

/// The entry point: the kernel leaves the stack 16-byte aligned here, where a function
/// expects it 8 bytes off (after a call's return address), so the call to `main` makes
/// it so.
#[unsafe(naked)]
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    naked_asm!("xor ebp, ebp", "and rsp, -16", "call {main}", "ud2", main = sym main)
}

extern "C" fn main() -> ! {
    let set: u64 = (1 << (SIGINT - 1)) | (1 << (SIGTERM - 1));
    let set_ptr = &set as *const u64 as usize;
    // SAFETY: `set` lives on this stack for the whole of the calls, SIGSET_SIZE bytes long.
    unsafe {
        syscall4(SYS_RT_SIGPROCMASK, SIG_BLOCK, set_ptr, 0, SIGSET_SIZE);
        // Interrupted waits (EINTR, a stop and continue) wait again.
        while !matches!(
            syscall4(SYS_RT_SIGTIMEDWAIT, set_ptr, 0, 0, SIGSET_SIZE),
            r if r == SIGINT as isize || r == SIGTERM as isize
        ) {}
    }
    exit(0)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(101)
}
