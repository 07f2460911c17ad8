//! The packet `sluice trace` is asked about: `PROTO SRC[:SPORT] -> DST:DPORT`, IPv4 or IPv6
//! (`tcp [fd00:10:244:1::5]:40000 -> [fd00:10:96::1]:80`: brackets around an IPv6 address with
//! a port; `tcp fd00:10:244:1::5 -> [fd00:10:96::1]:80` without a source port). Pure.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{packet::IpFlow, state::Protocol};

/// The syntax, for error messages and `--help`.
pub const SYNTAX: &str = "PROTO SRC[:SPORT] -> DST:DPORT";
/// The source port when none is given: in the Linux ephemeral range, easy to spot in output.
pub const DEFAULT_SPORT: u16 = 40_000;

/// A parsed packet spec: the flow of the packet to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketSpec {
    pub proto: Protocol,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

impl PacketSpec {
    pub fn flow(&self) -> IpFlow {
        IpFlow {
            proto: self.proto.number(),
            src: self.src,
            sport: self.sport,
            dst: self.dst,
            dport: self.dport,
        }
    }
}

/// Why a packet spec does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("empty packet")]
    Empty,
    #[error("unknown protocol {0:?}: expected tcp, udp or sctp")]
    UnknownProtocol(String),
    #[error("missing '->' between source and destination")]
    MissingArrow,
    #[error("more than one '->'")]
    SeveralArrows,
    #[error("missing source address")]
    MissingSource,
    #[error("missing destination address")]
    MissingDestination,
    #[error("bad {side} address {text:?}: not an {family} address")]
    BadAddress {
        side: Side,
        text: String,
        family: &'static str,
    },
    #[error("bad {side} {text:?}: expected [IPv6] or [IPv6]:PORT")]
    BadBrackets { side: Side, text: String },
    #[error("bad {side} port {text:?}: not a number")]
    BadPort { side: Side, text: String },
    #[error("{side} port {port} is out of range (1-65535)")]
    PortOutOfRange { side: Side, port: String },
    #[error("missing destination port: write DST:DPORT")]
    MissingDestinationPort,
    #[error(
        "missing destination port: write [DST]:DPORT (an IPv6 address with a port goes in \
         brackets)"
    )]
    MissingDestinationPort6,
    #[error(
        "source {src} and destination {dst} are of different families: trace IPv4 -> IPv4 or \
         IPv6 -> IPv6"
    )]
    MixedFamilies { src: IpAddr, dst: IpAddr },
}

impl SpecError {
    /// Whether the problem is with IPv6 syntax (the error message then shows an IPv6 example).
    pub fn about_ipv6(&self) -> bool {
        match self {
            SpecError::BadAddress { family, .. } => *family == "IPv6",
            SpecError::BadBrackets { .. }
            | SpecError::MissingDestinationPort6
            | SpecError::MixedFamilies { .. } => true,
            _ => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// Parses `PROTO SRC[:SPORT] -> DST:DPORT`: the protocol case-insensitively, any whitespace
/// around the parts, the source port defaulting to [`DEFAULT_SPORT`].
pub fn parse(text: &str) -> Result<PacketSpec, SpecError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(SpecError::Empty);
    }
    let (proto_text, rest) = text.split_once(char::is_whitespace).unwrap_or((text, ""));
    let proto = match proto_text.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => return Err(SpecError::UnknownProtocol(proto_text.to_owned())),
    };
    let mut sides = rest.split("->");
    let (Some(src_text), Some(dst_text)) = (sides.next(), sides.next()) else {
        return Err(SpecError::MissingArrow);
    };
    if sides.next().is_some() {
        return Err(SpecError::SeveralArrows);
    }
    let (src, sport) = endpoint(src_text.trim(), Side::Source)?;
    let (dst, dport) = endpoint(dst_text.trim(), Side::Destination)?;
    let dport = dport.ok_or(if dst.is_ipv6() {
        SpecError::MissingDestinationPort6
    } else {
        SpecError::MissingDestinationPort
    })?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(SpecError::MixedFamilies { src, dst });
    }
    Ok(PacketSpec {
        proto,
        src,
        sport: sport.unwrap_or(DEFAULT_SPORT),
        dst,
        dport,
    })
}

/// `ADDR` or `ADDR:PORT` (IPv4), `[ADDR]`, `[ADDR]:PORT` or a bare `ADDR` (IPv6).
fn endpoint(text: &str, side: Side) -> Result<(IpAddr, Option<u16>), SpecError> {
    if text.is_empty() {
        return Err(match side {
            Side::Source => SpecError::MissingSource,
            Side::Destination => SpecError::MissingDestination,
        });
    }
    let bad_address = |text: &str, family| SpecError::BadAddress {
        side,
        text: text.to_owned(),
        family,
    };
    if let Some(bracketed) = text.strip_prefix('[') {
        let Some((addr_text, rest)) = bracketed.split_once(']') else {
            return Err(SpecError::BadBrackets {
                side,
                text: text.to_owned(),
            });
        };
        let addr = addr_text
            .parse::<Ipv6Addr>()
            .map_err(|_| bad_address(addr_text, "IPv6"))?;
        let port = match rest {
            "" => None,
            _ => match rest.strip_prefix(':') {
                Some(p) => Some(port(p, side)?),
                None => {
                    return Err(SpecError::BadBrackets {
                        side,
                        text: text.to_owned(),
                    })
                }
            },
        };
        return Ok((addr.into(), port));
    }
    // A bare IPv6 address (two colons or more) has no port: `fd00::1:80` is an address.
    if text.matches(':').count() > 1 {
        let addr = text
            .parse::<Ipv6Addr>()
            .map_err(|_| bad_address(text, "IPv6"))?;
        return Ok((addr.into(), None));
    }
    let (addr_text, port_text) = match text.split_once(':') {
        Some((addr, port)) => (addr, Some(port)),
        None => (text, None),
    };
    let addr = addr_text
        .parse::<Ipv4Addr>()
        .map_err(|_| bad_address(addr_text, "IPv4"))?;
    let port = port_text.map(|p| port(p, side)).transpose()?;
    Ok((addr.into(), port))
}

fn port(text: &str, side: Side) -> Result<u16, SpecError> {
    let bad = || SpecError::BadPort {
        side,
        text: text.to_owned(),
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // Digits only: failing to fit a u16 means too large.
    match text.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(SpecError::PortOutOfRange {
            side,
            port: text.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(proto: Protocol, src: &str, sport: u16, dst: &str, dport: u16) -> PacketSpec {
        PacketSpec {
            proto,
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
        }
    }

    #[test]
    fn trace_spec_full_form() {
        assert_eq!(
            parse("tcp 10.0.0.1:1234 -> 10.96.0.1:80"),
            Ok(spec(Protocol::Tcp, "10.0.0.1", 1234, "10.96.0.1", 80))
        );
        assert_eq!(
            parse("udp 10.244.1.5:53000 -> 10.96.0.10:53"),
            Ok(spec(Protocol::Udp, "10.244.1.5", 53000, "10.96.0.10", 53))
        );
        assert_eq!(
            parse("sctp 10.244.1.5:1 -> 10.96.0.10:65535"),
            Ok(spec(Protocol::Sctp, "10.244.1.5", 1, "10.96.0.10", 65535))
        );
    }

    #[test]
    fn trace_spec_source_port_defaults() {
        assert_eq!(
            parse("tcp 10.0.0.1 -> 10.96.0.1:80"),
            Ok(spec(
                Protocol::Tcp,
                "10.0.0.1",
                DEFAULT_SPORT,
                "10.96.0.1",
                80
            ))
        );
    }

    #[test]
    fn trace_spec_tolerates_spaces_and_case() {
        let expected = Ok(spec(Protocol::Tcp, "10.0.0.1", 1234, "10.96.0.1", 80));
        for text in [
            "  tcp   10.0.0.1:1234   ->   10.96.0.1:80  ",
            "TCP 10.0.0.1:1234 -> 10.96.0.1:80",
            "Tcp\t10.0.0.1:1234->10.96.0.1:80",
            "tcp 10.0.0.1:1234->  10.96.0.1:80\n",
        ] {
            assert_eq!(parse(text), expected, "{text:?}");
        }
    }

    #[test]
    fn trace_spec_errors_name_the_problem() {
        let cases: &[(&str, &str)] = &[
            ("", "empty packet"),
            ("   ", "empty packet"),
            (
                "icmp 10.0.0.1 -> 10.96.0.1:80",
                "unknown protocol \"icmp\": expected tcp, udp or sctp",
            ),
            (
                "10.0.0.1 -> 10.96.0.1:80",
                "unknown protocol \"10.0.0.1\": expected tcp, udp or sctp",
            ),
            (
                "tcp 10.0.0.1 10.96.0.1:80",
                "missing '->' between source and destination",
            ),
            ("tcp", "missing '->' between source and destination"),
            (
                "tcp 10.0.0.1 -> 10.96.0.1:80 -> 10.0.0.2:1",
                "more than one '->'",
            ),
            ("tcp -> 10.96.0.1:80", "missing source address"),
            ("tcp 10.0.0.1 ->", "missing destination address"),
            (
                "tcp 10.0.0.300 -> 10.96.0.1:80",
                "bad source address \"10.0.0.300\": not an IPv4 address",
            ),
            (
                "tcp 10.0.0.1 -> frontend-service:80",
                "bad destination address \"frontend-service\": not an IPv4 address",
            ),
            (
                "tcp 10.0.0.1:0 -> 10.96.0.1:80",
                "source port 0 is out of range (1-65535)",
            ),
            (
                "tcp 10.0.0.1 -> 10.96.0.1:70000",
                "destination port 70000 is out of range (1-65535)",
            ),
            (
                "tcp 10.0.0.1 -> 10.96.0.1:0",
                "destination port 0 is out of range (1-65535)",
            ),
            (
                "tcp 10.0.0.1 -> 10.96.0.1:http",
                "bad destination port \"http\": not a number",
            ),
            (
                "tcp 10.0.0.1 -> 10.96.0.1:-1",
                "bad destination port \"-1\": not a number",
            ),
            (
                "tcp 10.0.0.1: -> 10.96.0.1:80",
                "bad source port \"\": not a number",
            ),
            (
                "tcp 10.0.0.1 -> 10.96.0.1",
                "missing destination port: write DST:DPORT",
            ),
            (
                "tcp fd00::1 -> 10.96.0.1:80",
                "source fd00::1 and destination 10.96.0.1 are of different families: trace \
                 IPv4 -> IPv4 or IPv6 -> IPv6",
            ),
            (
                "tcp 10.0.0.1 -> [fd00::1]:80",
                "source 10.0.0.1 and destination fd00::1 are of different families: trace \
                 IPv4 -> IPv4 or IPv6 -> IPv6",
            ),
            (
                "tcp fd00::5 -> fd00::1:80",
                "missing destination port: write [DST]:DPORT (an IPv6 address with a port goes \
                 in brackets)",
            ),
            (
                "tcp [fd00::5]:40000 -> fd00::1",
                "missing destination port: write [DST]:DPORT (an IPv6 address with a port goes \
                 in brackets)",
            ),
            (
                "tcp [fd00::5:40000 -> [fd00::1]:80",
                "bad source \"[fd00::5:40000\": expected [IPv6] or [IPv6]:PORT",
            ),
            (
                "tcp [fd00::5]40000 -> [fd00::1]:80",
                "bad source \"[fd00::5]40000\": expected [IPv6] or [IPv6]:PORT",
            ),
            (
                "tcp fd00::5 -> [fd00::g]:80",
                "bad destination address \"fd00::g\": not an IPv6 address",
            ),
            (
                "tcp fd00:::5 -> [fd00::1]:80",
                "bad source address \"fd00:::5\": not an IPv6 address",
            ),
            (
                "tcp [10.0.0.1]:1 -> [fd00::1]:80",
                "bad source address \"10.0.0.1\": not an IPv6 address",
            ),
            (
                "tcp fd00::5 -> [fd00::1]:0",
                "destination port 0 is out of range (1-65535)",
            ),
            (
                "tcp fd00::5 -> [fd00::1]:http",
                "bad destination port \"http\": not a number",
            ),
        ];
        for (text, message) in cases {
            let error = parse(text).expect_err(text);
            assert_eq!(error.to_string(), *message, "{text:?}");
            // IPv6 problems come with an IPv6 example, IPv4 (and port) ones keep theirs.
            let about_ipv6 = (text.contains('[') || text.contains("::"))
                && !message.contains("out of range")
                && !message.contains("not a number");
            assert_eq!(error.about_ipv6(), about_ipv6, "{text:?}");
        }
        // Absurdly long ports are still out of range, not a crash.
        assert!(matches!(
            parse("tcp 10.0.0.1 -> 10.96.0.1:99999999999999999999999"),
            Err(SpecError::PortOutOfRange { .. })
        ));
    }

    #[test]
    fn trace_spec_ipv6_forms() {
        let full = spec(
            Protocol::Tcp,
            "fd00:10:244:1::5",
            40_000,
            "fd00:10:96::1",
            80,
        );
        assert_eq!(
            parse("tcp [fd00:10:244:1::5]:40000 -> [fd00:10:96::1]:80"),
            Ok(full)
        );
        assert_eq!(
            parse("TCP  [fd00:10:244:1::5]:40000->[fd00:10:96::1]:80 "),
            Ok(full)
        );
        // Without a source port: bare or bracketed.
        let default_sport = spec(Protocol::Udp, "fd00::5", DEFAULT_SPORT, "fd00:10:96::a", 53);
        assert_eq!(
            parse("udp fd00::5 -> [fd00:10:96::a]:53"),
            Ok(default_sport)
        );
        assert_eq!(
            parse("udp [fd00::5] -> [fd00:10:96::a]:53"),
            Ok(default_sport)
        );
        assert_eq!(
            parse("sctp [::1]:1 -> [::ffff:10.96.0.1]:65535"),
            Ok(spec(Protocol::Sctp, "::1", 1, "::ffff:10.96.0.1", 65535))
        );
        let flow = parse("tcp [fd00::5]:1234 -> [fd00::1]:80").unwrap().flow();
        assert_eq!(flow.to_string(), "tcp [fd00::5]:1234 -> [fd00::1]:80");
        assert!(flow.v6().is_some() && flow.v4().is_none());
    }

    #[test]
    fn trace_spec_flow_carries_the_protocol_number() {
        let flow = parse("udp 10.0.0.1 -> 10.96.0.1:53").unwrap().flow();
        assert_eq!(flow.proto, 17);
        assert_eq!(flow.to_string(), "udp 10.0.0.1:40000 -> 10.96.0.1:53");
    }
}
