//! What a program did with a packet, read off what it returned and the packet it left: pure, so
//! every verdict (also those the datapath cannot produce yet) is unit-tested on hand-made output.
//!
//! Nothing here knows what the datapath is supposed to do: a trace reports the return code and
//! the difference between the packet that went in and the one that came out, so it stays
//! truthful as the programs grow.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use crate::packet::{
    self, IpDecoded, IpFlow, ICMPV6_DEST_UNREACHABLE, ICMP_DEST_UNREACHABLE, L4, PROTO_ICMP,
    PROTO_ICMPV6, TCP_RST,
};

/// tc actions a classifier returns (include/uapi/linux/pkt_cls.h).
pub const TC_ACT_UNSPEC: i32 = -1;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_RECLASSIFY: i32 = 1;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_PIPE: i32 = 3;
pub const TC_ACT_STOLEN: i32 = 4;
pub const TC_ACT_QUEUED: i32 = 5;
pub const TC_ACT_REPEAT: i32 = 6;
pub const TC_ACT_REDIRECT: i32 = 7;
pub const TC_ACT_TRAP: i32 = 8;

/// The name of a tc action, e.g. `TC_ACT_SHOT`.
pub fn tc_action_name(code: i32) -> String {
    match code {
        TC_ACT_UNSPEC => "TC_ACT_UNSPEC".into(),
        TC_ACT_OK => "TC_ACT_OK".into(),
        TC_ACT_RECLASSIFY => "TC_ACT_RECLASSIFY".into(),
        TC_ACT_SHOT => "TC_ACT_SHOT".into(),
        TC_ACT_PIPE => "TC_ACT_PIPE".into(),
        TC_ACT_STOLEN => "TC_ACT_STOLEN".into(),
        TC_ACT_QUEUED => "TC_ACT_QUEUED".into(),
        TC_ACT_REPEAT => "TC_ACT_REPEAT".into(),
        TC_ACT_REDIRECT => "TC_ACT_REDIRECT".into(),
        TC_ACT_TRAP => "TC_ACT_TRAP".into(),
        other => format!("tc action {other}"),
    }
}

/// What one program run did with the packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The packet goes on, rewritten or not (`redirected`: to another interface).
    Forwarded { packet: Vec<u8>, redirected: bool },
    /// Dropped (`TC_ACT_SHOT`) or taken out of the stack (`TC_ACT_STOLEN`, ...): `action` says
    /// which.
    Dropped { action: String },
    /// The program answered the sender instead of forwarding: a TCP RST or an ICMP destination
    /// unreachable addressed back to the packet's source. `how` describes the answer.
    Rejected { answer: IpDecoded, how: String },
}

/// Classifies one run: `code` is the program's return value, `output` the packet it left.
/// `input` is the flow of the packet that went in. Errors describe output that is not an IP
/// packet at all (a datapath bug the trace must not paper over).
pub fn classify(input: &IpFlow, code: u32, output: &[u8]) -> Result<Step, String> {
    // BPF_PROG_RUN returns the program's int as u32.
    let code = code as i32;
    match code {
        TC_ACT_SHOT | TC_ACT_STOLEN | TC_ACT_QUEUED | TC_ACT_TRAP => {
            return Ok(Step::Dropped {
                action: tc_action_name(code),
            })
        }
        _ => {}
    }
    let decoded = packet::decode_ip(output).map_err(|e| {
        format!(
            "the program returned {} and a packet that is not IPv4 or IPv6: {e}",
            tc_action_name(code)
        )
    })?;
    if let Some(how) = answer_to_sender(input, &decoded) {
        return Ok(Step::Rejected {
            answer: decoded,
            how,
        });
    }
    Ok(Step::Forwarded {
        packet: output.to_vec(),
        redirected: code == TC_ACT_REDIRECT,
    })
}

/// Whether `output` is an answer refusing `input` (and how), rather than `input` forwarded: a
/// TCP RST or an ICMP destination unreachable sent back to `input`'s source.
fn answer_to_sender(input: &IpFlow, output: &IpDecoded) -> Option<String> {
    if output.dst != input.src {
        return None;
    }
    match &output.l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
        } if flags & TCP_RST != 0 && *dport == input.sport => Some(format!(
            "TCP RST from {}",
            SocketAddr::new(output.src, *sport)
        )),
        L4::Icmp {
            icmp_type, code, ..
        } if output.proto == PROTO_ICMP && *icmp_type == ICMP_DEST_UNREACHABLE => Some(format!(
            "ICMP destination unreachable ({}) from {}",
            unreachable_code_name(*code),
            output.src
        )),
        L4::Icmp {
            icmp_type, code, ..
        } if output.proto == PROTO_ICMPV6 && *icmp_type == ICMPV6_DEST_UNREACHABLE => {
            Some(format!(
                "ICMPv6 destination unreachable ({}) from {}",
                unreachable6_code_name(*code),
                output.src
            ))
        }
        _ => None,
    }
}

fn unreachable_code_name(code: u8) -> String {
    match code {
        0 => "network unreachable".into(),
        1 => "host unreachable".into(),
        2 => "protocol unreachable".into(),
        3 => "port unreachable".into(),
        9 => "network administratively prohibited".into(),
        10 => "host administratively prohibited".into(),
        13 => "communication administratively prohibited".into(),
        other => format!("code {other}"),
    }
}

/// ICMPv6 destination unreachable codes (RFC 4443 section 3.1).
fn unreachable6_code_name(code: u8) -> String {
    match code {
        0 => "no route to destination".into(),
        1 => "communication administratively prohibited".into(),
        2 => "beyond scope of source address".into(),
        3 => "address unreachable".into(),
        4 => "port unreachable".into(),
        5 => "source address failed ingress/egress policy".into(),
        6 => "reject route to destination".into(),
        other => format!("code {other}"),
    }
}

/// The verdicts `sluice trace` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// Forwarded with the destination rewritten (to a backend).
    Dnat,
    /// Refused with an answer to the sender (TCP RST, ICMP unreachable).
    Reject,
    /// Dropped without an answer.
    Drop,
    /// Forwarded with the destination unchanged.
    Pass,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Dnat => "DNAT",
            Verdict::Reject => "REJECT",
            Verdict::Drop => "DROP",
            Verdict::Pass => "PASS",
        })
    }
}

/// A forwarded packet compared with the one that went in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite {
    /// The packet's flow as it leaves.
    pub flow: IpFlow,
    /// The new destination, when it changed.
    pub dnat: Option<SocketAddr>,
    /// The new source address, when it changed (masquerade).
    pub snat: Option<IpAddr>,
}

impl Rewrite {
    pub fn verdict(&self) -> Verdict {
        if self.dnat.is_some() {
            Verdict::Dnat
        } else {
            Verdict::Pass
        }
    }
}

/// How the forwarded `output` differs from `input`.
pub fn rewrite(input: &IpFlow, output: &[u8]) -> Result<Rewrite, String> {
    let decoded = packet::decode_ip(output)?;
    let Some(flow) = decoded.flow() else {
        return Err(format!(
            "the forwarded packet has no ports any more: {decoded}"
        ));
    };
    let dnat = ((flow.dst, flow.dport) != (input.dst, input.dport)).then(|| flow.destination());
    let snat = (flow.src != input.src).then_some(flow.src);
    Ok(Rewrite { flow, dnat, snat })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use sluice_common::{PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::packet::{
        first_ip_packet, internet_checksum, ipv4_packet, tcp_ip_packet, ETH_HLEN, IPV4_HLEN,
        PROTO_ICMP, TCP_ACK, TCP_SYN,
    };

    const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
    const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
    const BACKEND4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
    const CLIENT: IpAddr = IpAddr::V4(CLIENT4);
    const VIP: IpAddr = IpAddr::V4(VIP4);
    const BACKEND: IpAddr = IpAddr::V4(BACKEND4);

    fn syn_flow() -> IpFlow {
        IpFlow {
            proto: PROTO_TCP,
            src: CLIENT,
            sport: 40_000,
            dst: VIP,
            dport: 80,
        }
    }

    fn forwarded(step: Step) -> Vec<u8> {
        match step {
            Step::Forwarded { packet, .. } => packet,
            other => panic!("not forwarded: {other:?}"),
        }
    }

    #[test]
    fn trace_verdict_untouched_packet_passes() {
        let input = syn_flow();
        let packet = first_ip_packet(&input, &[]);
        let out = forwarded(classify(&input, 0, &packet).unwrap());
        let rewrite = rewrite(&input, &out).unwrap();
        assert_eq!(rewrite.verdict(), Verdict::Pass);
        assert_eq!((rewrite.dnat, rewrite.snat), (None, None));
        assert_eq!(rewrite.flow, input);
        // TC_ACT_UNSPEC (-1 as u32) also lets the packet go on.
        assert!(matches!(
            classify(&input, u32::MAX, &packet).unwrap(),
            Step::Forwarded {
                redirected: false,
                ..
            }
        ));
    }

    #[test]
    fn trace_verdict_rewritten_destination_is_dnat_and_source_is_masquerade() {
        let input = syn_flow();
        let out_flow = IpFlow {
            dst: BACKEND,
            dport: 8080,
            ..input
        };
        let out = forwarded(classify(&input, 0, &first_ip_packet(&out_flow, &[])).unwrap());
        let dnat = rewrite(&input, &out).unwrap();
        assert_eq!(dnat.verdict(), Verdict::Dnat);
        assert_eq!(dnat.dnat, Some(SocketAddr::new(BACKEND, 8080)));
        assert_eq!(dnat.snat, None);

        let node = IpAddr::from([172, 18, 0, 3]);
        let masqueraded = IpFlow {
            src: node,
            sport: 61_000,
            ..out_flow
        };
        let both = rewrite(&input, &first_ip_packet(&masqueraded, &[])).unwrap();
        assert_eq!(both.verdict(), Verdict::Dnat);
        assert_eq!(both.snat, Some(node));
        assert_eq!(both.flow, masqueraded);
    }

    #[test]
    fn trace_verdict_shot_and_stolen_are_drops() {
        let input = syn_flow();
        let packet = first_ip_packet(&input, &[]);
        for (code, action) in [(2, "TC_ACT_SHOT"), (4, "TC_ACT_STOLEN")] {
            assert_eq!(
                classify(&input, code, &packet).unwrap(),
                Step::Dropped {
                    action: action.into()
                }
            );
        }
    }

    #[test]
    fn trace_verdict_rst_to_the_sender_is_a_reject() {
        let input = syn_flow();
        let rst = tcp_ip_packet(&input.reversed(), TCP_RST | TCP_ACK, &[]);
        for code in [TC_ACT_REDIRECT as u32, TC_ACT_OK as u32] {
            match classify(&input, code, &rst).unwrap() {
                Step::Rejected { how, answer } => {
                    assert_eq!(how, "TCP RST from 10.96.0.1:80");
                    assert_eq!(answer.flow(), Some(input.reversed()));
                }
                other => panic!("{other:?}"),
            }
        }
        // A SYN-ACK back to the sender is not a refusal (whatever that would mean).
        let syn_ack = tcp_ip_packet(&input.reversed(), TCP_SYN | TCP_ACK, &[]);
        assert!(matches!(
            classify(&input, 7, &syn_ack).unwrap(),
            Step::Forwarded {
                redirected: true,
                ..
            }
        ));
    }

    #[test]
    fn trace_verdict_icmp_unreachable_to_the_sender_is_a_reject() {
        let input = IpFlow {
            proto: PROTO_UDP,
            ..syn_flow()
        };
        let original = first_ip_packet(&input, b"query");
        let mut icmp = vec![ICMP_DEST_UNREACHABLE, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&original[ETH_HLEN..ETH_HLEN + IPV4_HLEN + 8]);
        let csum = internet_checksum(&icmp);
        icmp[2..4].copy_from_slice(&csum.to_be_bytes());
        let answer = ipv4_packet(VIP4, CLIENT4, PROTO_ICMP, icmp.clone(), None);
        match classify(&input, TC_ACT_REDIRECT as u32, &answer).unwrap() {
            Step::Rejected { how, .. } => assert_eq!(
                how,
                "ICMP destination unreachable (port unreachable) from 10.96.0.1"
            ),
            other => panic!("{other:?}"),
        }
        // The same ICMP error addressed elsewhere is not an answer to this sender.
        let elsewhere = ipv4_packet(VIP4, BACKEND4, PROTO_ICMP, icmp, None);
        assert!(matches!(
            classify(&input, 0, &elsewhere).unwrap(),
            Step::Forwarded { .. }
        ));
        assert!(rewrite(&input, &elsewhere).is_err(), "no ports to compare");
    }

    #[test]
    fn trace_verdict_ipv6_dnat_masquerade_and_rejects() {
        use crate::packet::{icmp6_packet, ETH_P_IPV6, IPV6_HLEN};
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let input = IpFlow {
            proto: PROTO_TCP,
            src: v6("2001:db8::10"),
            sport: 40_000,
            dst: v6("fc00::3"),
            dport: 30_080,
        };
        let packet = first_ip_packet(&input, &[]);
        assert_eq!(
            u16::from_be_bytes([packet[12], packet[13]]),
            ETH_P_IPV6,
            "an IPv6 flow makes an IPv6 packet"
        );
        let out_flow = IpFlow {
            src: v6("fc00::3"),
            sport: 61_000,
            dst: v6("fd00:10:244:2::40"),
            dport: 8080,
            ..input
        };
        let out = forwarded(classify(&input, 0, &first_ip_packet(&out_flow, &[])).unwrap());
        let nat = rewrite(&input, &out).unwrap();
        assert_eq!(nat.verdict(), Verdict::Dnat);
        assert_eq!(nat.dnat, Some(out_flow.destination()));
        assert_eq!(nat.dnat.unwrap().to_string(), "[fd00:10:244:2::40]:8080");
        assert_eq!(nat.snat, Some(v6("fc00::3")));

        let rst = tcp_ip_packet(&input.reversed(), TCP_RST | TCP_ACK, &[]);
        match classify(&input, TC_ACT_REDIRECT as u32, &rst).unwrap() {
            Step::Rejected { how, answer } => {
                assert_eq!(how, "TCP RST from [fc00::3]:30080");
                assert_eq!(answer.flow(), Some(input.reversed()));
            }
            other => panic!("{other:?}"),
        }

        let udp = IpFlow {
            proto: PROTO_UDP,
            ..input
        };
        let original = first_ip_packet(&udp, b"query");
        let mut body = vec![0; 4];
        body.extend_from_slice(&original[ETH_HLEN..ETH_HLEN + IPV6_HLEN + 8]);
        let unreachable = |code| {
            icmp6_packet(
                "fc00::3".parse().unwrap(),
                "2001:db8::10".parse().unwrap(),
                ICMPV6_DEST_UNREACHABLE,
                code,
                &body,
            )
        };
        match classify(&udp, TC_ACT_REDIRECT as u32, &unreachable(4)).unwrap() {
            Step::Rejected { how, answer } => {
                assert_eq!(
                    how,
                    "ICMPv6 destination unreachable (port unreachable) from fc00::3"
                );
                assert_eq!(
                    answer.to_string(),
                    "icmpv6 fc00::3 -> 2001:db8::10 type 1 code 4"
                );
            }
            other => panic!("{other:?}"),
        }
        // ICMPv6 type 3 is time exceeded, not an unreachable.
        let exceeded = icmp6_packet(
            "fc00::3".parse().unwrap(),
            "2001:db8::10".parse().unwrap(),
            3,
            0,
            &body,
        );
        assert!(matches!(
            classify(&udp, 0, &exceeded).unwrap(),
            Step::Forwarded { .. }
        ));
        assert!(matches!(
            classify(&udp, 2, &original).unwrap(),
            Step::Dropped { .. }
        ));
    }

    #[test]
    fn trace_verdict_garbage_output_is_an_error_not_a_verdict() {
        let error = classify(&syn_flow(), 0, &[0u8; 20]).unwrap_err();
        assert!(error.contains("not IPv4"), "{error}");
    }
}
