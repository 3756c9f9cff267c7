/// Why a value from outside (a manifest, a discovery message, a certificate)
/// is not a valid piece of mesh vocabulary.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid SPIFFE identity {input:?}: {reason}")]
    InvalidIdentity { input: String, reason: String },
    #[error("workload {workload}: invalid IP address {input:?}")]
    InvalidIp { workload: String, input: String },
    #[error("{what}: missing {field}")]
    MissingField { what: String, field: &'static str },
    #[error("policy {policy}: {reason}")]
    InvalidPolicy { policy: String, reason: String },
    #[error("service {service}: {reason}")]
    InvalidService { service: String, reason: String },
    #[error("open port {input:?}: {why}")]
    InvalidOpenPort { input: String, why: String },
    #[error("{what}: unknown tunnel protocol {value}")]
    UnknownProtocol { what: String, value: i32 },
}
