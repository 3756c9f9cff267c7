//! Non-TCP ports an enrolled STRICT pod opens to traffic from outside the
//! mesh: the mesh carries TCP only, so a UDP or SCTP packet from outside
//! the pod is dropped before the app unless its port is listed here.
//!
//! Written `udp/5353` or `sctp/3868`, comma-separated, in the annotation
//! [`PLAINTEXT_INBOUND_PORTS_ANNOTATION`] of the pod or its namespace.

use std::fmt;
use std::str::FromStr;

use kanava_proto::v1 as pb;

use crate::Error;

/// Annotation on a Pod or Namespace listing the non-TCP ports that take
/// packets from outside the pod without the mesh (`udp/5353,sctp/3868`).
pub const PLAINTEXT_INBOUND_PORTS_ANNOTATION: &str = "kanava.io/plaintext-inbound-ports";

/// A transport protocol the mesh does not carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortProtocol {
    Udp,
    Sctp,
}

impl PortProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Udp => "udp",
            PortProtocol::Sctp => "sctp",
        }
    }
}

/// One opened port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpenPort {
    pub protocol: PortProtocol,
    pub port: u16,
}

impl fmt::Display for OpenPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol.as_str(), self.port)
    }
}

impl FromStr for OpenPort {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::InvalidOpenPort {
            input: text.to_string(),
            why: why.to_string(),
        };
        let (protocol, port) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("write udp/PORT or sctp/PORT"))?;
        let protocol = match protocol.to_ascii_lowercase().as_str() {
            "udp" => PortProtocol::Udp,
            "sctp" => PortProtocol::Sctp,
            "tcp" => return Err(bad("TCP goes through the mesh; it cannot be opened")),
            _ => return Err(bad("the protocol is udp or sctp")),
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|port| *port != 0)
            .ok_or_else(|| bad("the port is 1 to 65535"))?;
        Ok(OpenPort { protocol, port })
    }
}

impl OpenPort {
    /// Parses an annotation's value: comma-separated, spaces allowed, empty
    /// entries ignored, sorted and without repeats.
    pub fn parse_list(text: &str) -> Result<Vec<OpenPort>, Error> {
        let mut ports = text
            .split(',')
            .filter(|entry| !entry.trim().is_empty())
            .map(str::parse)
            .collect::<Result<Vec<OpenPort>, _>>()?;
        ports.sort();
        ports.dedup();
        Ok(ports)
    }

    pub fn to_proto(self) -> pb::OpenPort {
        pb::OpenPort {
            protocol: match self.protocol {
                PortProtocol::Udp => pb::PortProtocol::Udp,
                PortProtocol::Sctp => pb::PortProtocol::Sctp,
            } as i32,
            port: u32::from(self.port),
        }
    }

    pub fn from_proto(port: &pb::OpenPort) -> Result<Self, Error> {
        let protocol = match pb::PortProtocol::try_from(port.protocol) {
            Ok(pb::PortProtocol::Udp) => PortProtocol::Udp,
            Ok(pb::PortProtocol::Sctp) => PortProtocol::Sctp,
            Err(_) => {
                return Err(Error::UnknownProtocol {
                    what: "open port".into(),
                    value: port.protocol,
                });
            }
        };
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Error::InvalidOpenPort {
                input: port.port.to_string(),
                why: "the port is 1 to 65535".into(),
            })?;
        Ok(OpenPort {
            protocol,
            port: number,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_parse_sorted_and_unique() {
        let ports = OpenPort::parse_list(" udp/5353, SCTP/3868,udp/53,, udp/53").unwrap();
        let shown: Vec<String> = ports.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["udp/53", "udp/5353", "sctp/3868"]);
        assert!(OpenPort::parse_list("").unwrap().is_empty());
    }

    #[test]
    fn bad_entries_say_why() {
        for (text, why) in [
            ("tcp/80", "TCP goes through the mesh"),
            ("udp/0", "1 to 65535"),
            ("udp/70000", "1 to 65535"),
            ("53", "write udp/PORT"),
            ("icmp/1", "udp or sctp"),
        ] {
            let err = OpenPort::parse_list(text).unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }

    #[test]
    fn proto_round_trip() {
        let port = OpenPort {
            protocol: PortProtocol::Sctp,
            port: 3868,
        };
        assert_eq!(OpenPort::from_proto(&port.to_proto()).unwrap(), port);
        let zero = pb::OpenPort {
            protocol: 0,
            port: 0,
        };
        assert!(OpenPort::from_proto(&zero).is_err());
    }
}
