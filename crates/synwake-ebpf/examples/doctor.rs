//! Prints what `synwake doctor` will report about the eBPF probe on this machine.
//! Run: `cargo run -p synwake-ebpf --example doctor` (as root).

fn main() {
    println!("{}", synwake_ebpf::doctor());
}
