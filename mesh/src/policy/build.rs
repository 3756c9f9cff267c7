//! Building validated policy parts from text, as users write them (the
//! CRD) or as they travel (the wire).

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Destination, Pattern, Source};

/// The textual fields of a source entry, as written by users or sent over
/// the wire; [`build`](Self::build) validates them.
pub struct SourceBuilder<'a, S: AsRef<str>> {
    pub principals: &'a [S],
    pub not_principals: &'a [S],
    pub namespaces: &'a [S],
    pub not_namespaces: &'a [S],
    pub ip_blocks: &'a [S],
    pub not_ip_blocks: &'a [S],
}

impl<S: AsRef<str>> SourceBuilder<'_, S> {
    pub fn build(&self) -> Result<Source, String> {
        let source = Source {
            principals: principals(self.principals)?,
            not_principals: principals(self.not_principals)?,
            namespaces: patterns(self.namespaces)?,
            not_namespaces: patterns(self.not_namespaces)?,
            ip_blocks: ip_blocks(self.ip_blocks)?,
            not_ip_blocks: ip_blocks(self.not_ip_blocks)?,
        };
        if source == Source::default() {
            return Err("a `from` entry sets no field and would match every source; omit `from` to mean that".into());
        }
        Ok(source)
    }
}

/// A validated `to` entry.
pub fn destination(ports: &[u32], not_ports: &[u32]) -> Result<Destination, String> {
    let check = |ports: &[u32]| {
        ports
            .iter()
            .map(|&p| {
                u16::try_from(p)
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| format!("port {p} is not in 1-65535"))
            })
            .collect::<Result<Vec<u16>, String>>()
    };
    let destination = Destination {
        ports: check(ports)?,
        not_ports: check(not_ports)?,
    };
    if destination == Destination::default() {
        return Err(
            "a `to` entry sets no field and would match every port; omit `to` to mean that".into(),
        );
    }
    Ok(destination)
}

fn patterns<S: AsRef<str>>(texts: &[S]) -> Result<Vec<Pattern>, String> {
    texts.iter().map(|t| Pattern::parse(t.as_ref())).collect()
}

/// Principals may be written with or without `spiffe://`.
fn principals<S: AsRef<str>>(texts: &[S]) -> Result<Vec<Pattern>, String> {
    texts
        .iter()
        .map(|t| {
            let t = t.as_ref();
            Pattern::parse(t.strip_prefix("spiffe://").unwrap_or(t))
        })
        .collect()
}

fn ip_blocks<S: AsRef<str>>(texts: &[S]) -> Result<Vec<IpNet>, String> {
    texts
        .iter()
        .map(|t| {
            let t = t.as_ref();
            t.parse::<IpNet>()
                .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| format!("{t:?} is not an IP address or CIDR block"))
        })
        .collect()
}
