//! Bad input to `PoolAlloc`: a global allocator must not unwind, so misuse it can detect
//! aborts the process with a message. Each case runs in a child process (this test binary
//! again, with the case named in `PAGEPOOL_BAD_CASE`), and the parent checks that the child
//! died of `SIGABRT` and said why on stderr.
//!
//! | misuse | message |
//! |---|---|
//! | a small object freed twice | `double free of a small object` |
//! | ... the second time after its CPU's cache was drained back into the slab | the same |
//! | ... the first free on another thread (a remote free), the second here | the same |
//! | a pointer into the middle of a small object | `not the start of a small object` |
//! | a pointer past the last object of a slab (its left-over tail) | the same |
//! | ... after its slab emptied and went back to the pool | `not an allocated pool block` |
//! | a page block freed twice | `not an allocated pool block` |
//! | `realloc` of a pointer into the middle of a page block | `not a pool block allocated with this layout` |

use std::alloc::{GlobalAlloc, Layout};
use std::process::Command;

use pagepool::{PoolAlloc, PoolBuilder};

static UNDER_TEST: PoolAlloc =
    PoolAlloc::with_config(PoolBuilder::new().capacity(256 << 20).max_order(10));

const CASE: &str = "PAGEPOOL_BAD_CASE";

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// The misuses, run in the child. Each must abort; returning is a failure.
fn misuse(case: &str) {
    // SAFETY (every case): deliberately breaks GlobalAlloc's contract; the process is a
    // child that is expected to abort at the marked call.
    unsafe {
        match case {
            "double_free" => {
                let p = UNDER_TEST.alloc(layout(48));
                UNDER_TEST.dealloc(p, layout(48));
                UNDER_TEST.dealloc(p, layout(48));
            }
            "double_free_after_drain" => {
                let keep = UNDER_TEST.alloc(layout(100)); // keeps the slab alive
                let p = UNDER_TEST.alloc(layout(100));
                UNDER_TEST.dealloc(p, layout(100));
                UNDER_TEST.drain_caches(); // the object is on its slab's free list now
                UNDER_TEST.dealloc(p, layout(100));
                UNDER_TEST.dealloc(keep, layout(100));
            }
            "double_free_after_the_slab_emptied" => {
                let p = UNDER_TEST.alloc(layout(100));
                UNDER_TEST.dealloc(p, layout(100));
                UNDER_TEST.drain_caches(); // the slab empties and goes back to the pool
                UNDER_TEST.dealloc(p, layout(100));
            }
            "double_free_remote" => {
                let p = UNDER_TEST.alloc(layout(200)) as usize;
                std::thread::spawn(move || UNDER_TEST.dealloc(p as *mut u8, layout(200)))
                    .join()
                    .unwrap();
                UNDER_TEST.dealloc(p as *mut u8, layout(200));
            }
            "interior_pointer" => {
                let p = UNDER_TEST.alloc(layout(64));
                UNDER_TEST.dealloc(p.add(16), layout(48));
            }
            "slab_tail" => {
                // 3 KiB objects: a 16 KiB slab holds 5, and 1 KiB is left over at its end.
                let p = UNDER_TEST.alloc(layout(3072));
                let slab_end = (p as usize | 0x3fff) + 1;
                UNDER_TEST.dealloc(p.with_addr(slab_end - 1024), layout(1024));
            }
            "page_double_free" => {
                let p = UNDER_TEST.alloc(layout(256 << 10));
                UNDER_TEST.dealloc(p, layout(256 << 10));
                UNDER_TEST.dealloc(p, layout(256 << 10));
            }
            "page_interior_realloc" => {
                let p = UNDER_TEST.alloc(layout(256 << 10));
                UNDER_TEST.realloc(p.add(4096), layout(128 << 10), 512 << 10);
            }
            other => panic!("unknown case {other}"),
        }
    }
}

/// Runs `case` in a child and checks it aborted with `message` on stderr.
fn aborts_with(case: &str, message: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
        .env(CASE, case)
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGABRT),
        "{case}: the child did not abort ({:?}); stderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains(message),
        "{case}: expected {message:?} on stderr, got:\n{stderr}"
    );
}

/// The child's entry point: does nothing unless `PAGEPOOL_BAD_CASE` names a case.
#[test]
fn child() {
    if let Ok(case) = std::env::var(CASE) {
        misuse(&case);
        eprintln!("{case}: the misuse was not caught");
        std::process::exit(3);
    }
}

#[test]
fn double_free_of_a_small_object_aborts() {
    aborts_with("double_free", "double free of a small object");
}

#[test]
fn double_free_after_a_drain_aborts() {
    aborts_with("double_free_after_drain", "double free of a small object");
}

#[test]
fn double_free_after_a_remote_free_aborts() {
    aborts_with("double_free_remote", "double free of a small object");
}

#[test]
fn double_free_after_the_slab_emptied_aborts() {
    aborts_with(
        "double_free_after_the_slab_emptied",
        "not an allocated pool block",
    );
}

#[test]
fn a_pointer_into_an_object_aborts() {
    aborts_with("interior_pointer", "not the start of a small object");
}

#[test]
fn a_pointer_into_a_slabs_tail_aborts() {
    aborts_with("slab_tail", "not the start of a small object");
}

#[test]
fn double_free_of_a_page_block_aborts() {
    aborts_with("page_double_free", "not an allocated pool block");
}

#[test]
fn realloc_of_a_pointer_into_a_page_block_aborts() {
    aborts_with(
        "page_interior_realloc",
        "not a pool block allocated with this layout",
    );
}
