//! The workloads under jemalloc (`tikv-jemallocator`, default settings: no background
//! thread).

#[global_allocator]
static A: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() {
    pagepool_apps::main("jemalloc", &Vec::new);
}
