//! Pushing a packet through the programs of its path, its answer back, and (`--all`) the same
//! packet again and again to see every backend the programs choose. The programs are reached
//! through [`ProgramRunner`] so this logic is unit-tested against a fake datapath; `sluice trace`
//! runs the real one with `BPF_PROG_RUN`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use anyhow::Context as _;
use sluice_common::Reason;

use super::{
    hooks::{self, EntryPoint, Hop, PacketPath, Program},
    verdict::{self, Rewrite, Step, Verdict},
};
use crate::{
    datapath::ProgramRun,
    packet::{self, IpDecoded, IpFlow},
};

/// Payload of the UDP datagrams a trace sends (TCP sends a bare SYN, SCTP an INIT).
pub const PAYLOAD: &[u8] = b"sluice trace";

/// Runs the datapath's programs on packets.
pub trait ProgramRunner {
    /// Runs `program` on `packet`; returns its return code, the packet as it left it and the
    /// reason it gave for a drop or an answer.
    fn run(&mut self, program: Program, packet: &[u8]) -> anyhow::Result<ProgramRun>;
    /// Forgets every connection earlier runs created (conntrack), so that the next packet is
    /// balanced as the first of a new connection.
    fn forget_connections(&mut self) -> anyhow::Result<()>;
}

/// How a packet's way through a list of programs ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// It went on as `rewrite.flow`.
    Forwarded {
        rewrite: Rewrite,
        /// The program that redirected it to another interface, if one did.
        redirected_by: Option<&'static str>,
    },
    Dropped {
        by: &'static str,
        action: String,
        /// The datapath's reason (`sluice_common::Reason`), when it gave one.
        reason: Option<Reason>,
    },
    Rejected {
        by: &'static str,
        answer: IpDecoded,
        how: String,
        reason: Option<Reason>,
    },
}

impl End {
    pub fn verdict(&self) -> Verdict {
        match self {
            End::Forwarded { rewrite, .. } => rewrite.verdict(),
            End::Dropped { .. } => Verdict::Drop,
            End::Rejected { .. } => Verdict::Reject,
        }
    }

    /// The backend the packet was sent to.
    pub fn backend(&self) -> Option<SocketAddr> {
        match self {
            End::Forwarded { rewrite, .. } => rewrite.dnat,
            _ => None,
        }
    }
}

/// One packet's way: how it ended, and anything odd the programs did on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub end: End,
    /// E.g. a program that left a wrong checksum: the datapath's bugs, reported, not hidden.
    pub warnings: Vec<String>,
}

/// Every backend the programs chose for the packet over `runs` runs (`--all`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choices {
    pub backends: BTreeSet<SocketAddr>,
    pub runs: usize,
    /// How many backends the `services` map says the frontend has, when it is a frontend.
    pub expected: Option<usize>,
    /// Runs that ended in another verdict than the first run's, by verdict.
    pub other_verdicts: BTreeMap<Verdict, usize>,
}

/// The answer of the packet's receiver, sent back through the programs on the reply path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyCheck {
    /// The answer as the receiver sends it: the forwarded packet's flow, reversed.
    pub sent: IpFlow,
    pub programs: Vec<&'static str>,
    pub outcome: Outcome,
    /// The answer reaches the sender from the address and port it sent to.
    pub from_original_destination: bool,
}

/// Everything a trace found out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trace {
    pub input: IpFlow,
    pub entry: EntryPoint,
    pub path: PacketPath,
    /// The first run (the one the verdict reports).
    pub first: Outcome,
    /// The packet as the forward hops (`path.forward`) sent it on, if they did (the first run
    /// can still end in a drop at the receiver's `to_pod`).
    pub forwarded: Option<Rewrite>,
    /// The receiving pod's `to_pod`, when the receiver is a pod on this node: it checks the
    /// pod's ingress policy.
    pub receiver_hop: Option<Hop>,
    pub reply: Option<ReplyCheck>,
    pub choices: Option<Choices>,
}

/// What to find out besides the first packet's fate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// Drive the backend choice until every backend has been chosen (`--all`).
    pub all: bool,
    /// The frontend's backend count (from the `services` map), to know when `--all` is done.
    pub expected_backends: Option<usize>,
    /// Addresses of this node's pods (the backends marked local): their answers enter the
    /// datapath through their veth, other receivers' through the external interface.
    pub local_addresses: BTreeSet<IpAddr>,
    /// Pods on this node (known with a node name): a packet forwarded to one of them meets its
    /// `to_pod` (ingress policy) before it is delivered.
    pub local_pods: BTreeSet<IpAddr>,
}

/// How many runs `--all` allows itself: enough that missing one of `n` equally likely backends
/// is practically impossible (n * (1 - 1/n)^(100 n) < n * e^-100), bounded.
pub fn run_cap(expected_backends: Option<usize>) -> usize {
    match expected_backends {
        Some(n) => n.saturating_mul(100).clamp(100, 10_000),
        None => 1_000,
    }
}

/// Traces `input`, a new connection's first packet, entering at `entry`.
pub fn trace(
    runner: &mut impl ProgramRunner,
    entry: EntryPoint,
    input: IpFlow,
    options: Options,
) -> anyhow::Result<Trace> {
    let path = hooks::path(entry);
    let packet = packet::first_ip_packet(&input, PAYLOAD);
    let mut first = push(runner, path.forward, &input, &packet)?;
    let forwarded = match &first.end {
        End::Forwarded { rewrite, .. } => Some(*rewrite),
        _ => None,
    };
    let receiver_hop = forwarded
        .as_ref()
        .filter(|rewrite| options.local_pods.contains(&rewrite.flow.dst))
        .map(|_| hooks::TO_RECEIVER_POD);
    if let (Some(rewrite), Some(hop)) = (&forwarded, receiver_hop) {
        // The receiver's to_pod on the packet as forwarded; it only ever passes or drops a
        // packet on its way in (the reply translation is for answers).
        let delivered = packet::first_ip_packet(&rewrite.flow, PAYLOAD);
        let at_receiver = push(runner, &[hop], &rewrite.flow, &delivered)?;
        first.warnings.extend(at_receiver.warnings);
        if let End::Dropped { .. } | End::Rejected { .. } = at_receiver.end {
            first.end = at_receiver.end;
        }
    }

    // Before `--all` forgets the connection: the answer needs the first run's conntrack entries.
    let reply = match &first.end {
        End::Forwarded { rewrite, .. } => {
            // A pod reaching itself (hairpin) answers from this node too.
            let receiver = rewrite.flow.dst;
            let local = options.local_addresses.contains(&receiver) || receiver == input.src;
            let hops = hooks::reply_path(entry, local);
            Some(check_reply(runner, hops, &input, rewrite)?)
        }
        End::Dropped { .. } | End::Rejected { .. } => None,
    };

    let choices = if options.all {
        Some(drive_choices(
            runner,
            path.forward,
            &input,
            &packet,
            &first,
            options.expected_backends,
        )?)
    } else {
        None
    };
    Ok(Trace {
        input,
        entry,
        path,
        first,
        forwarded,
        receiver_hop,
        reply,
        choices,
    })
}

/// Runs `packet` (of `flow`) through `hops` in order, until one drops or answers it.
fn push(
    runner: &mut impl ProgramRunner,
    hops: &[Hop],
    flow: &IpFlow,
    packet: &[u8],
) -> anyhow::Result<Outcome> {
    let mut current = packet.to_vec();
    let mut current_flow = *flow;
    let mut redirected_by = None;
    let mut warnings = Vec::new();
    for hop in hops {
        let name = hop.program.name();
        let ran = runner
            .run(hop.program, &current)
            .with_context(|| format!("running {name} on {current_flow}"))?;
        let out = ran.packet;
        let step = verdict::classify(&current_flow, ran.return_value, &out)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        match step {
            Step::Dropped { action } => {
                return Ok(Outcome {
                    end: End::Dropped {
                        by: name,
                        action,
                        reason: ran.reason,
                    },
                    warnings,
                })
            }
            Step::Rejected { answer, how } => {
                if let Err(e) = packet::verify_ip_checksums(&out) {
                    warnings.push(format!("{name} answered with a broken packet: {e}"));
                }
                return Ok(Outcome {
                    end: End::Rejected {
                        by: name,
                        answer,
                        how,
                        reason: ran.reason,
                    },
                    warnings,
                });
            }
            Step::Forwarded { packet, redirected } => {
                if let Err(e) = packet::verify_ip_checksums(&packet) {
                    warnings.push(format!("{name} left a broken packet: {e}"));
                }
                if redirected {
                    redirected_by = Some(name);
                }
                current_flow = verdict::rewrite(flow, &packet)
                    .map_err(|e| anyhow::anyhow!("{name}: {e}"))?
                    .flow;
                current = packet;
            }
        }
    }
    let rewrite = verdict::rewrite(flow, &current).map_err(|e| anyhow::anyhow!(e))?;
    Ok(Outcome {
        end: End::Forwarded {
            rewrite,
            redirected_by,
        },
        warnings,
    })
}

/// Sends the receiver's answer to the forwarded packet back through the reply path.
fn check_reply(
    runner: &mut impl ProgramRunner,
    hops: &[Hop],
    input: &IpFlow,
    forwarded: &Rewrite,
) -> anyhow::Result<ReplyCheck> {
    let sent = forwarded.flow.reversed();
    let answer = packet::first_ip_answer(&sent, PAYLOAD);
    let outcome = push(runner, hops, &sent, &answer)?;
    let from_original_destination = match &outcome.end {
        End::Forwarded { rewrite, .. } => rewrite.flow == input.reversed(),
        End::Dropped { .. } | End::Rejected { .. } => false,
    };
    Ok(ReplyCheck {
        sent,
        programs: hops.iter().map(|h| h.program.name()).collect(),
        outcome,
        from_original_destination,
    })
}

/// Runs the same first packet again, forgetting the connection before each run, until every
/// backend the frontend has was chosen or [`run_cap`] runs were made. Only the programs' choices
/// count: the `backends` map is not read.
fn drive_choices(
    runner: &mut impl ProgramRunner,
    hops: &[Hop],
    input: &IpFlow,
    packet: &[u8],
    first: &Outcome,
    expected: Option<usize>,
) -> anyhow::Result<Choices> {
    let mut choices = Choices {
        backends: BTreeSet::new(),
        runs: 1,
        expected,
        other_verdicts: BTreeMap::new(),
    };
    let Some(backend) = first.end.backend() else {
        // Nothing was balanced: there is no choice to drive.
        return Ok(choices);
    };
    choices.backends.insert(backend);
    let cap = run_cap(expected);
    while choices.runs < cap && expected.is_none_or(|n| choices.backends.len() < n) {
        runner.forget_connections()?;
        let outcome = push(runner, hops, input, packet)?;
        choices.runs += 1;
        match outcome.end.backend() {
            Some(backend) => {
                choices.backends.insert(backend);
            }
            None => {
                *choices
                    .other_verdicts
                    .entry(outcome.end.verdict())
                    .or_default() += 1
            }
        }
    }
    Ok(choices)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv4Addr};

    use sluice_common::{PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::packet::{first_ip_packet, tcp_ip_packet, TCP_ACK, TCP_RST};

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 0, 5));
    const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1));
    const VIP6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, 1));

    fn backend(last: u8) -> SocketAddr {
        SocketAddr::new(Ipv4Addr::new(10, 244, 1, last).into(), 8080)
    }

    /// What the fake does with packets to the VIP.
    #[derive(Clone, Copy, PartialEq)]
    enum Mode {
        Balance,
        Drop,
        Reject,
        /// DNATs, but leaves the checksums alone.
        BreakChecksums,
    }

    /// A datapath in miniature: balances new flows to the VIP pseudo-randomly and, unlike the
    /// real `from_pod`, keeps even a TCP SYN on its remembered backend, so `--all` only sees
    /// every backend if it really forgets the connection between runs.
    struct FakeDatapath {
        mode: Mode,
        backends: Vec<SocketAddr>,
        /// Client flow -> backend, and backend-side flow -> VIP, like the real conntrack.
        forward: HashMap<IpFlow, SocketAddr>,
        reverse: HashMap<IpFlow, SocketAddr>,
        seed: u32,
        runs: usize,
    }

    impl FakeDatapath {
        fn new(mode: Mode, backends: Vec<SocketAddr>) -> Self {
            FakeDatapath {
                mode,
                backends,
                forward: HashMap::new(),
                reverse: HashMap::new(),
                seed: 12345,
                runs: 0,
            }
        }

        fn random(&mut self) -> u32 {
            self.seed = self.seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            self.seed >> 16
        }
    }

    impl ProgramRunner for FakeDatapath {
        fn run(&mut self, program: Program, packet: &[u8]) -> anyhow::Result<ProgramRun> {
            let (return_value, packet) = self.run_fake(program, packet)?;
            Ok(ProgramRun {
                return_value,
                packet,
                reason: (return_value == 2).then_some(sluice_common::REASON_DROP_SOURCE_RANGE),
            })
        }

        fn forget_connections(&mut self) -> anyhow::Result<()> {
            self.forward.clear();
            self.reverse.clear();
            Ok(())
        }
    }

    impl FakeDatapath {
        fn run_fake(&mut self, program: Program, packet: &[u8]) -> anyhow::Result<(u32, Vec<u8>)> {
            self.runs += 1;
            let flow = packet::decode_ip(packet).unwrap().flow().unwrap();
            match program {
                Program::FromPod
                    if (flow.dst == VIP || flow.dst == VIP6) && !self.backends.is_empty() =>
                {
                    match self.mode {
                        Mode::Drop => return Ok((2, packet.to_vec())),
                        Mode::Reject => {
                            let rst = tcp_ip_packet(&flow.reversed(), TCP_RST | TCP_ACK, &[]);
                            return Ok((7, rst));
                        }
                        Mode::Balance | Mode::BreakChecksums => {}
                    }
                    let chosen = match self.forward.get(&flow) {
                        Some(known) => *known,
                        None => {
                            let slot = self.random() as usize % self.backends.len();
                            self.backends[slot]
                        }
                    };
                    self.forward.insert(flow, chosen);
                    let out = IpFlow {
                        dst: chosen.ip(),
                        dport: chosen.port(),
                        ..flow
                    };
                    self.reverse.insert(out.reversed(), flow.destination());
                    let mut rewritten = first_ip_packet(&out, PAYLOAD);
                    if self.mode == Mode::BreakChecksums {
                        let original = packet::first_ip_packet(&flow, PAYLOAD);
                        rewritten[24..26].copy_from_slice(&original[24..26]);
                    }
                    Ok((0, rewritten))
                }
                Program::ToPod => match self.reverse.get(&flow) {
                    Some(vip) => {
                        let out = IpFlow {
                            src: vip.ip(),
                            sport: vip.port(),
                            ..flow
                        };
                        Ok((0, packet::first_ip_answer(&out, PAYLOAD)))
                    }
                    None => Ok((0, packet.to_vec())),
                },
                Program::FromPod | Program::FromWorld | Program::ToWorld => {
                    Ok((0, packet.to_vec()))
                }
            }
        }
    }

    fn to_vip(proto: u8) -> IpFlow {
        IpFlow {
            proto,
            src: CLIENT,
            sport: 40_000,
            dst: VIP,
            dport: 80,
        }
    }

    fn all(expected: usize) -> Options {
        Options {
            all: true,
            expected_backends: Some(expected),
            ..Options::default()
        }
    }

    #[test]
    fn trace_dnat_with_the_reply_seen_from_the_vip() {
        let three = vec![backend(1), backend(2), backend(3)];
        let mut fake = FakeDatapath::new(Mode::Balance, three.clone());
        let trace = trace(
            &mut fake,
            EntryPoint::Pod,
            to_vip(PROTO_TCP),
            Options::default(),
        )
        .unwrap();
        assert_eq!(trace.first.end.verdict(), Verdict::Dnat);
        let chosen = trace.first.end.backend().unwrap();
        assert!(three.contains(&chosen));
        assert!(
            trace.first.warnings.is_empty(),
            "{:?}",
            trace.first.warnings
        );
        assert_eq!(trace.choices, None);
        let reply = trace.reply.unwrap();
        assert_eq!(reply.sent.src, chosen.ip());
        // Not a local backend: the answer enters from the backend's node.
        assert_eq!(reply.programs, ["from_world", "to_pod"]);
        assert!(reply.from_original_destination);
        assert_eq!(fake.runs, 3, "one forward run, two reply runs");

        // A local backend's answer enters through its veth.
        let mut fake = FakeDatapath::new(Mode::Balance, vec![backend(1)]);
        let options = Options {
            local_addresses: [backend(1).ip()].into(),
            ..Options::default()
        };
        let local = super::trace(&mut fake, EntryPoint::Pod, to_vip(PROTO_TCP), options).unwrap();
        assert_eq!(local.reply.unwrap().programs, ["from_pod", "to_pod"]);
    }

    #[test]
    fn trace_all_forgets_the_connection_until_every_backend_was_chosen() {
        let three = vec![backend(1), backend(2), backend(3)];
        let mut fake = FakeDatapath::new(Mode::Balance, three.clone());
        let trace = trace(&mut fake, EntryPoint::Pod, to_vip(PROTO_UDP), all(3)).unwrap();
        let choices = trace.choices.unwrap();
        assert_eq!(choices.backends, three.into_iter().collect());
        assert!(
            choices.runs >= 3 && choices.runs < run_cap(Some(3)),
            "{choices:?}"
        );
        assert!(choices.other_verdicts.is_empty());
    }

    #[test]
    fn trace_all_stops_at_the_cap_when_a_backend_is_never_chosen() {
        // The map claims four backends, the programs only ever choose among two.
        let mut fake = FakeDatapath::new(Mode::Balance, vec![backend(1), backend(2)]);
        let trace = trace(&mut fake, EntryPoint::Pod, to_vip(PROTO_TCP), all(4)).unwrap();
        let choices = trace.choices.unwrap();
        assert_eq!(choices.backends.len(), 2);
        assert_eq!(choices.runs, run_cap(Some(4)));
        assert_eq!(choices.runs, 400);
    }

    #[test]
    fn trace_all_without_a_balanced_packet_runs_once() {
        let mut fake = FakeDatapath::new(Mode::Balance, vec![]);
        let trace = trace(&mut fake, EntryPoint::Pod, to_vip(PROTO_TCP), all(0)).unwrap();
        assert_eq!(trace.first.end.verdict(), Verdict::Pass);
        let choices = trace.choices.unwrap();
        assert!(choices.backends.is_empty());
        assert_eq!(choices.runs, 1);
        // The untouched packet's answer comes back from where it was sent.
        assert!(trace.reply.unwrap().from_original_destination);
    }

    #[test]
    fn trace_drop_and_reject_end_the_way_without_a_reply() {
        let mut fake = FakeDatapath::new(Mode::Drop, vec![backend(1)]);
        let dropped = trace(&mut fake, EntryPoint::Pod, to_vip(PROTO_TCP), all(1)).unwrap();
        assert_eq!(
            dropped.first.end,
            End::Dropped {
                by: "from_pod",
                action: "TC_ACT_SHOT".into(),
                reason: Some(sluice_common::REASON_DROP_SOURCE_RANGE),
            }
        );
        assert_eq!(dropped.reply, None);
        assert!(dropped.choices.unwrap().backends.is_empty());

        let mut fake = FakeDatapath::new(Mode::Reject, vec![backend(1)]);
        let rejected = trace(
            &mut fake,
            EntryPoint::Pod,
            to_vip(PROTO_TCP),
            Options::default(),
        )
        .unwrap();
        match &rejected.first.end {
            End::Rejected { by, how, .. } => {
                assert_eq!(*by, "from_pod");
                assert_eq!(how, "TCP RST from 10.96.0.1:80");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rejected.first.end.verdict(), Verdict::Reject);
    }

    #[test]
    fn trace_ipv6_dnat_all_and_reject() {
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let backends: Vec<SocketAddr> = ["[fd00:10:244:1::10]:8080", "[fd00:10:244:2::10]:8080"]
            .iter()
            .map(|b| b.parse().unwrap())
            .collect();
        let input = IpFlow {
            proto: PROTO_UDP,
            src: v6("fd00:10:244:1::5"),
            sport: 40_000,
            dst: VIP6,
            dport: 53,
        };
        let mut fake = FakeDatapath::new(Mode::Balance, backends.clone());
        let options = Options {
            local_addresses: [backends[0].ip()].into(),
            ..all(2)
        };
        let trace = trace(&mut fake, EntryPoint::Pod, input, options).unwrap();
        assert_eq!(trace.first.end.verdict(), Verdict::Dnat);
        assert!(
            trace.first.warnings.is_empty(),
            "{:?}",
            trace.first.warnings
        );
        assert_eq!(
            trace.choices.unwrap().backends,
            backends.iter().copied().collect()
        );
        let reply = trace.reply.unwrap();
        assert!(reply.from_original_destination, "{reply:?}");
        assert!(reply.outcome.warnings.is_empty());

        let mut fake = FakeDatapath::new(Mode::Reject, backends);
        let tcp = IpFlow {
            proto: PROTO_TCP,
            ..input
        };
        let rejected = super::trace(&mut fake, EntryPoint::Pod, tcp, Options::default()).unwrap();
        match &rejected.first.end {
            End::Rejected { how, answer, .. } => {
                assert_eq!(how, "TCP RST from [fd00:10:96::1]:53");
                assert_eq!(answer.flow(), Some(tcp.reversed()));
            }
            other => panic!("{other:?}"),
        }
        assert!(rejected.first.warnings.is_empty());
    }

    #[test]
    fn trace_reports_broken_checksums() {
        let mut fake = FakeDatapath::new(Mode::BreakChecksums, vec![backend(1)]);
        let trace = trace(
            &mut fake,
            EntryPoint::Pod,
            to_vip(PROTO_TCP),
            Options::default(),
        )
        .unwrap();
        assert_eq!(trace.first.end.verdict(), Verdict::Dnat);
        assert_eq!(trace.first.warnings.len(), 1, "{:?}", trace.first.warnings);
        assert!(
            trace.first.warnings[0].starts_with("from_pod left a broken packet"),
            "{:?}",
            trace.first.warnings
        );
    }

    #[test]
    fn trace_without_hooks_runs_nothing_and_passes() {
        let entry = EntryPoint::Host;
        let mut fake = FakeDatapath::new(Mode::Balance, vec![backend(1)]);
        let trace = trace(&mut fake, entry, to_vip(PROTO_TCP), all(1)).unwrap();
        assert_eq!(fake.runs, 0, "{entry}");
        assert_eq!(trace.first.end.verdict(), Verdict::Pass);
        assert!(trace.path.unhooked.is_some());
        let reply = trace.reply.unwrap();
        assert!(reply.programs.is_empty());
    }
}
