//! `sluice trace`: runs a synthetic packet through the real programs with `BPF_PROG_RUN` and
//! reports what the datapath does with it.
//!
//! The state comes from the manifests exactly as the agent builds it (`manifests::load_dir`,
//! `node::resolve` with the agent's own [`NodeOptions`], `translate::translate`,
//! `Datapath::sync`), programmed into a datapath with private, unpinned maps
//! ([`Datapath::load_unpinned`]): a trace never touches a running agent's maps, attaches nothing
//! and sends nothing on any interface.
//!
//! * [`spec`] parses the packet (`PROTO SRC[:SPORT] -> DST:DPORT`, IPv4 or IPv6);
//! * [`hooks`] maps the entry point (`--from`) to the programs on the packet's way;
//! * [`engine`] runs them (and `--all`, and the reply check);
//! * [`verdict`] reads a program run's return code and output packet;
//! * [`policy_verdict`] names the NetworkPolicy that allowed or denied the packet;
//! * [`report`] prints the result (the JSON format is documented there).
//!
//! Exit codes: 0 the packet was traced (whatever the verdict); 1 the trace could not run (e.g.
//! no permission to load BPF programs); 2 bad input (packet, node name, manifests).

pub mod engine;
pub mod hooks;
pub mod host;
pub mod policy_verdict;
pub mod report;
pub mod spec;
pub mod verdict;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;

use self::{
    engine::{Options, ProgramRunner},
    hooks::{EntryPoint, Program},
    report::Report,
};
use crate::{
    datapath::{self, Datapath, ProgramRun},
    manifests,
    node::{self, NodeContext, NodeOptions},
    packet::IpFlow,
    policy::PolicyState,
    state::{DesiredState, Frontend, Protocol},
    translate,
};

/// Exit code of a trace that could not run.
const EXIT_FAILED: u8 = 1;
/// Exit code for bad input: the packet, the node name, the manifests.
const EXIT_BAD_INPUT: u8 = 2;

/// Arguments of `sluice trace`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Exit status: 0 traced, 1 the trace could not run (it needs root or \
    CAP_BPF), 2 bad input (packet, node name, manifests).\n\nExamples:\n  \
    sluice trace --manifests examples/ecommerce 'tcp 10.244.1.5 -> 10.96.0.1:8080'\n  \
    sluice trace --manifests DIR --cluster-cidr 10.244.0.0/16 --all --json \
    'udp 10.244.1.5:5353 -> 10.96.0.10:53'\n  \
    sluice trace --manifests DIR --cluster-cidr 10.244.0.0/16,fd00:10:244::/56 --all \
    'tcp [fd00:10:244:1::5]:40000 -> [fd00:10:96::1]:80'"
)]
pub struct TraceArgs {
    /// Directory of manifests, as for `sluice agent --manifests`: Services, EndpointSlices and
    /// Nodes.
    #[arg(long)]
    pub manifests: PathBuf,
    #[command(flatten)]
    pub node: NodeOptions,
    /// Where the packet enters the node. Default: `host` for one of the node's addresses
    /// (--node-name), `pod` for a source in --cluster-cidr (any source without it), `external`
    /// otherwise.
    #[arg(long, value_enum)]
    pub from: Option<EntryPoint>,
    /// Also find every backend the datapath can choose for this packet, by running it again and
    /// again (forgetting the connection in between) until each backend was chosen.
    #[arg(long)]
    pub all: bool,
    /// Print one JSON object (format: agent/src/trace/report.rs) instead of a readable report.
    #[arg(long)]
    pub json: bool,
    /// On manifest problems, trace the state the agent would program (it skips the bad objects)
    /// instead of failing. The problems are still printed. A --node-name that names no Node
    /// object stays an error.
    #[arg(long)]
    pub ignore_errors: bool,
    /// The packet, quoted: 'PROTO SRC[:SPORT] -> DST:DPORT', e.g. 'tcp 10.244.1.5 ->
    /// 10.96.0.1:80' or, IPv6 (brackets around an address with a port), 'tcp
    /// [fd00:10:244:1::5]:40000 -> [fd00:10:96::1]:80'. PROTO is tcp, udp or sctp; both
    /// addresses are of the same family; SPORT defaults to 40000. A TCP packet is a SYN, so it
    /// opens a new connection.
    #[arg(value_name = "PACKET")]
    pub packet: String,
}

/// A failed trace: what to print, and with which exit code.
struct Failure {
    code: u8,
    lines: Vec<String>,
}

impl Failure {
    fn bad_input(lines: Vec<String>) -> Failure {
        Failure {
            code: EXIT_BAD_INPUT,
            lines,
        }
    }
}

pub fn run(args: TraceArgs) -> ExitCode {
    match trace(&args) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            for line in failure.lines {
                eprintln!("sluice trace: {line}");
            }
            ExitCode::from(failure.code)
        }
    }
}

fn trace(args: &TraceArgs) -> Result<String, Failure> {
    // The cheapest check first: a typo in the packet needs no BPF and no manifests.
    let spec = spec::parse(&args.packet).map_err(|e| {
        let example = if e.about_ipv6() {
            "'tcp 10.244.1.5 -> 10.96.0.1:80' or 'tcp [fd00:10:244:1::5]:40000 -> \
             [fd00:10:96::1]:80'"
        } else {
            "'tcp 10.244.1.5 -> 10.96.0.1:80'"
        };
        Failure::bad_input(vec![format!(
            "bad packet {:?}: {e} (expected '{}', e.g. {example})",
            args.packet,
            spec::SYNTAX
        )])
    })?;
    let (desired, node, policy) = desired_state(args)?;
    let entry = args
        .from
        .unwrap_or_else(|| EntryPoint::default_for(spec.src, &node));

    let mut datapath = Datapath::load_unpinned_lazily()
        .context("loading the datapath with private maps (this needs root or CAP_BPF)")
        .map_err(failed)?;
    // The node's context exactly as the agent writes it.
    datapath
        .set_node_config(&node)
        .context("programming the private config map")
        .map_err(failed)?;
    let stats = datapath
        .sync(&desired)
        .context("programming the private maps")
        .map_err(failed)?;
    // The agent carries on without a frontend it cannot program; so does the trace, loudly.
    for (frontend, error) in &stats.failed {
        eprintln!("sluice trace: warning: {frontend} could not be programmed: {error}");
    }
    let (wire, _) = crate::policy::to_wire(&policy, &crate::policy::compile(&policy));
    let policy_stats = datapath.sync_policy(&wire);
    for failure in &policy_stats.failed {
        eprintln!("sluice trace: warning: policy not programmed: {failure}");
    }
    let flow = spec.flow();
    // Pods on this node (a node name tells which): their to_pod is on a forwarded packet's way.
    let local_pods: std::collections::BTreeSet<std::net::IpAddr> = if node.name.is_some() {
        policy.pods.keys().copied().collect()
    } else {
        Default::default()
    };
    let expected_backends = frontend_backend_count(&datapath, &flow, entry);
    let mut runner = BpfRunner {
        datapath: &mut datapath,
    };
    let options = Options {
        all: args.all,
        expected_backends,
        local_addresses: desired
            .services
            .values()
            .flat_map(|entry| entry.local_backends.iter().map(|b| b.ip))
            .chain(local_pods.iter().copied())
            .collect(),
        local_pods,
    };
    let trace = engine::trace(&mut runner, entry, flow, options).map_err(failed)?;
    let mut report = Report::new(&trace, &desired).with_policy(&trace, &desired, &policy);
    if entry == EntryPoint::Host {
        let decision = datapath
            .socket_decision(flow.dst, flow.dport, flow.proto)
            .context("reading the socket programs' decision from the private maps")
            .map_err(failed)?;
        host::apply(&mut report, &flow, &decision);
    }
    Ok(if args.json {
        let mut json = serde_json::to_string_pretty(&report).expect("a report serialises");
        json.push('\n');
        json
    } else {
        report.human(&trace)
    })
}

fn failed(error: anyhow::Error) -> Failure {
    Failure {
        code: EXIT_FAILED,
        lines: vec![format!("{error:#}")],
    }
}

/// The state the agent would program from the manifests and node options (services, and the
/// NetworkPolicy of the node's pods). Manifest and translation problems are bad input unless
/// `--ignore-errors`; an unknown node always is.
fn desired_state(args: &TraceArgs) -> Result<(DesiredState, NodeContext, PolicyState), Failure> {
    let (objects, manifest_errors) = manifests::load_dir(&args.manifests)
        .map_err(|e| Failure::bad_input(vec![format!("{e:#}")]))?;
    let node = node::resolve(&args.node, &objects)
        .map_err(|unknown| Failure::bad_input(vec![unknown.to_string()]))?;
    let (desired, translate_errors) = translate::translate(&objects, &node);
    let (policy, policy_errors) = crate::policy::resolve(&objects, &node);
    let (_, overflows) = crate::policy::to_wire(&policy, &crate::policy::compile(&policy));
    let problems: Vec<String> = manifest_errors
        .iter()
        .map(ToString::to_string)
        .chain(
            translate_errors
                .iter()
                .chain(&policy_errors)
                .map(|e| objects.describe(&e.object, &e.message)),
        )
        .chain(overflows.iter().map(ToString::to_string))
        .collect();
    if problems.is_empty() {
        return Ok((desired, node, policy));
    }
    if args.ignore_errors {
        for problem in &problems {
            eprintln!("sluice trace: warning: skipped, as the agent does: {problem}");
        }
        return Ok((desired, node, policy));
    }
    let mut lines = problems;
    lines.push(format!(
        "{} in {}; the agent would skip the objects named. Fix them, or pass --ignore-errors to \
         trace the state the agent would program",
        if lines.len() == 1 {
            "1 manifest problem".to_string()
        } else {
            format!("{} manifest problems", lines.len())
        },
        args.manifests.display()
    ));
    Err(Failure::bad_input(lines))
}

/// How many backends the `services` (or `services6`) map holds for the flow's frontend, if it
/// is one, for a packet entering at `entry` (a pod's packet uses the frontend's pods' entry
/// when it has one, `sluice_common::SCOPE_POD`).
fn frontend_backend_count(datapath: &Datapath, flow: &IpFlow, entry: EntryPoint) -> Option<usize> {
    let frontend = Frontend {
        ip: flow.dst,
        port: flow.dport,
        proto: Protocol::from_number(flow.proto)?,
    };
    if flow.v6().is_some() {
        let pods = match entry {
            EntryPoint::Pod => datapath.backend_count6(&frontend, sluice_common::SCOPE_POD),
            _ => None,
        };
        return pods.or_else(|| datapath.backend_count6(&frontend, sluice_common::SCOPE_ALL));
    }
    let matching: Vec<_> = datapath
        .programmed_services()
        .into_iter()
        .filter(|s| s.frontend == Some(frontend))
        .collect();
    let pods = matching
        .iter()
        .find(|s| s.key.scope == sluice_common::SCOPE_POD);
    let all = matching
        .iter()
        .find(|s| s.key.scope == sluice_common::SCOPE_ALL);
    match (entry, pods) {
        (EntryPoint::Pod, Some(pods)) => Some(pods),
        _ => all,
    }
    .map(|s| s.backend_count as usize)
}

/// The real programs, run with BPF_PROG_RUN on the private datapath. The programs' FIB
/// lookups (for the packets they redirect) see the routes of the namespace `sluice trace` runs
/// in; without a forwarding route they hand the packet to the stack, which a trace reports as
/// not redirected.
struct BpfRunner<'a> {
    datapath: &'a mut Datapath,
}

impl ProgramRunner for BpfRunner<'_> {
    fn run(&mut self, program: Program, packet: &[u8]) -> anyhow::Result<ProgramRun> {
        let classifier = self.datapath.classifier(program.name())?;
        datapath::run_program(classifier, packet, None)
            .with_context(|| format!("BPF_PROG_RUN of {}", program.name()))
    }

    fn forget_connections(&mut self) -> anyhow::Result<()> {
        // These maps are private to this trace: every entry in them belongs to the one flow
        // being traced, so all of them go. The affinity map stays: a client's next connection
        // is what sessionAffinity is about.
        self.datapath
            .purge_conntrack(|_, _| true)
            .context("clearing the private conntrack map")?;
        self.datapath
            .purge_conntrack6(|_, _| true)
            .context("clearing the private conntrack6 map")?;
        self.datapath
            .clear_policy_flows()
            .context("clearing the private policy_flows map")?;
        Ok(())
    }
}
