//! What this kernel's BPF can do, probed once, and what the datapath does without it
//! (issue #12: Sluice runs on Linux 5.10 and later; the README's "Kernels" section lists what
//! each older kernel loses).

use std::sync::OnceLock;

use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, BpfHelper},
    EbpfLoader, VerifierLogLevel,
};

/// The kernel features the datapath adapts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFeatures {
    /// `bpf_set_retval` in cgroup programs (Linux 5.18): a socket program fails connect() to a
    /// service without endpoints with ECONNREFUSED, as kube-proxy's REJECT does; without it
    /// the call fails with EPERM.
    pub sock_set_retval: bool,
    /// `SO_NETNS_COOKIE` (Linux 5.14): the agent learns its network namespace's cookie, which
    /// the socket programs compare to balance only the node's own sockets. Without it the
    /// socket programs are not attached: traffic the node itself sends to a service is not
    /// translated.
    pub netns_cookie: bool,
    /// tcx links (Linux 6.6): programs pinned in links and swapped atomically on restart;
    /// without them, a clsact qdisc and tc filters replaced in place.
    pub tcx: bool,
}

impl KernelFeatures {
    /// The features of the running kernel, probed on first use.
    pub fn get() -> KernelFeatures {
        static FEATURES: OnceLock<KernelFeatures> = OnceLock::new();
        *FEATURES.get_or_init(|| KernelFeatures {
            sock_set_retval: is_helper_supported(
                ProgramType::CgroupSockAddr,
                BpfHelper::BPF_FUNC_set_retval,
            )
            .unwrap_or(false),
            netns_cookie: super::sock::own_netns_cookie().is_ok(),
            tcx: super::tcx_supported(),
        })
    }

    /// One line per missing feature: what is missing, the kernel that has it, and what the
    /// datapath does instead. Empty on a kernel that has them all.
    pub fn missing(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if !self.sock_set_retval {
            lines.push(
                "kernel lacks bpf_set_retval in cgroup programs (Linux 5.18): connect() from the \
                 node to a service without endpoints fails with EPERM instead of ECONNREFUSED"
                    .to_owned(),
            );
        }
        if !self.netns_cookie {
            lines.push(
                "kernel lacks SO_NETNS_COOKIE (Linux 5.14): host-socket load balancing is off \
                 (the node's own connections to services are not translated; pods' are)"
                    .to_owned(),
            );
        }
        if !self.tcx {
            lines.push(
                "kernel lacks tcx links (Linux 6.6): programs are attached with a clsact qdisc \
                 and tc filters, replaced in place on restart"
                    .to_owned(),
            );
        }
        lines
    }
}

/// An object loader with the globals set for this kernel's features. Every load of the eBPF
/// object goes through it.
pub fn loader<'a>() -> EbpfLoader<'a> {
    let features = KernelFeatures::get();
    let mut loader = EbpfLoader::new();
    // No verifier log: aya's default (every instruction logged, the load repeated with a
    // bigger buffer each time the log fills) costs several verifications per program, which
    // made older kernels' loads take many seconds. A refusal is explained by loading the
    // program again with the log on (verify::describe_load_error).
    loader.verifier_log_level(VerifierLogLevel::DISABLE);
    let set_retval: &'static u8 = if features.sock_set_retval { &1 } else { &0 };
    loader.override_global("SOCK_SET_RETVAL", set_retval, true);
    loader
}

/// The running kernel's release (`uname -r`), for messages.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "(unknown release)".to_owned())
}
