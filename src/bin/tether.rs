//! The `tether` command; all of it lives in the `tether-cli` crate.

// The server allocates many small buffers per request; mimalloc measured ~40% more end-to-end
// throughput than the system allocator on the benchmark (benches/end_to_end.rs).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tether_cli::main()
}
