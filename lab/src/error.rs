/// Why a lab operation failed. Messages are meant for the person running
/// the lab: they name the file, pod, node or command involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Spec(String),
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        what: String,
        after: std::time::Duration,
    },
    #[error("{what} exited ({status}); last lines of its log:\n{log_tail}")]
    Exited {
        what: String,
        status: String,
        log_tail: String,
    },
    #[error("no lab named {0:?} is running")]
    NoSuchLab(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error(
        "a lab named {0:?} is already running; choose another --name or run `kanava lab down --name {0}`"
    )]
    AlreadyRunning(String),
    #[error("{0}")]
    Missing(String),
    #[error("handoff of pod {pod} to the ztunnel on {node} failed: {reason}")]
    Handoff {
        pod: String,
        node: String,
        reason: String,
    },
    #[error("interrupted")]
    Cancelled,
    #[error("{0}")]
    Netns(#[from] kanava_netns::Error),
    #[error("lab state {path}: {reason}")]
    State { path: String, reason: String },
}

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
