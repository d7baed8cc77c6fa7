//! The workloads under the system allocator (glibc `malloc`).

#[global_allocator]
static A: std::alloc::System = std::alloc::System;

fn main() {
    pagepool_apps::main("system", &Vec::new);
}
