//! The plugin's errors, and how each is reported to the container runtime:
//! a JSON object `{cniVersion, code, msg, details}` on standard output and a
//! non-zero exit status (CNI specification, "Error").

/// Error codes of the CNI specification; ours start at 100.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The ztunnel refused or could not be reached for an enrolled pod.
    pub const NOT_CAPTURED: u32 = 100;
    /// The ztunnel refused to release a pod (GC; DEL only logs it).
    pub const NOT_RELEASED: u32 = 101;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unsupported cniVersion {0:?} (kanava-cni speaks {versions})", versions = crate::SUPPORTED_VERSIONS.join(", "))]
    IncompatibleVersion(String),
    #[error("{0}")]
    Environment(String),
    #[error("the network configuration on standard input is not valid JSON: {0}")]
    Decode(String),
    #[error("{0}")]
    Config(String),
    #[error("cannot tell whether pod {pod} is in the mesh: {reason}")]
    Enrollment { pod: String, reason: String },
    #[error(
        "pod {pod} is in the mesh but the node's ztunnel did not capture it, so it must not start: {source}"
    )]
    NotCaptured {
        pod: String,
        source: kanava_handoff::Error,
    },
    #[error("the node's ztunnel did not release pod {pod}: {source}")]
    NotReleased {
        pod: String,
        source: kanava_handoff::Error,
    },
    #[error("{context}: {reason}")]
    Io { context: String, reason: String },
}

impl Error {
    /// The CNI error code.
    pub fn code(&self) -> u32 {
        match self {
            Error::IncompatibleVersion(_) => code::INCOMPATIBLE_VERSION,
            Error::Environment(_) => code::INVALID_ENVIRONMENT,
            Error::Decode(_) => code::DECODE_FAILURE,
            Error::Config(_) => code::INVALID_CONFIG,
            Error::Enrollment { .. } => code::TRY_AGAIN_LATER,
            Error::NotCaptured { .. } => code::NOT_CAPTURED,
            Error::NotReleased { .. } => code::NOT_RELEASED,
            Error::Io { .. } => code::IO_FAILURE,
        }
    }

    /// What the runtime reads on standard output.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code(),
            "msg": self.to_string(),
        })
    }
}
