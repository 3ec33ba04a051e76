fn main() {
    let probe = synwake_ebpf::Probe::load().unwrap();
    let run = probe
        .test_run(synwake_ebpf::Hook::Xdp, &[0u8; 60], 1)
        .unwrap();
    println!("{:?} {:?}", run.verdict, probe.stats());
}
