//! The workloads under mimalloc.

#[global_allocator]
static A: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    pagepool_apps::main("mimalloc", &Vec::new);
}
