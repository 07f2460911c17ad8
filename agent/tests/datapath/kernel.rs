//! Every program the agent loads loads on this kernel (the kernel matrix runs this test in
//! QEMU on 5.10, 6.1 and 6.12; issue #12). A rejection names the program and quotes the
//! verifier's last lines.

use sluice::datapath::verify::load_each_program;

#[test]
fn every_program_loads_on_this_kernel() {
    let loads = load_each_program().expect("loading the eBPF object's maps");
    let names: Vec<&str> = loads.iter().map(|l| l.name.as_str()).collect();
    // The object has the four tc programs and the eight socket programs.
    for expected in [
        "from_pod",
        "to_pod",
        "from_world",
        "to_world",
        "sock_connect4",
        "sock_recvmsg6",
    ] {
        assert!(
            names.contains(&expected),
            "no program {expected} in {names:?}"
        );
    }
    assert_eq!(loads.len(), 12, "{names:?}");
    let refused: Vec<String> = loads
        .iter()
        .filter_map(|l| {
            l.error
                .as_ref()
                .map(|e| format!("program `{}`: {e}", l.name))
        })
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {} programs were refused by this kernel ({}):\n\n{}",
        refused.len(),
        loads.len(),
        kernel_release(),
        refused.join("\n\n")
    );
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
