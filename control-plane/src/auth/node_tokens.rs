//! Node credentials of the lab (`--source manifests`).
//!
//! The control plane knows one token per node, from a file of `<node-name> <token>` lines (the
//! lab writes it when it creates the nodes; blank lines and `#` comments are
//! ignored). A token grants exactly one node: its ztunnel may subscribe to
//! discovery as that node and obtain certificates only for identities of pods
//! scheduled there.
//!
//! Tokens are kept only as SHA-256 digests, so lookups compare digests and
//! reveal nothing about the secret through timing.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::Refusal;
use crate::Error;

/// Shortest token accepted in the credentials file.
const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Default)]
pub struct NodeAuthenticator {
    nodes_by_digest: HashMap<[u8; 32], String>,
}

impl NodeAuthenticator {
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::File {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| Error::NodeTokens {
            path: path.to_path_buf(),
            reason,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut auth = NodeAuthenticator::default();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(node), Some(token), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(format!(
                    "line {}: expected `<node-name> <token>`",
                    number + 1
                ));
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "line {}: token for node {node} is shorter than {MIN_TOKEN_LEN} characters",
                    number + 1
                ));
            }
            if let Some(other) = auth.nodes_by_digest.insert(digest(token), node.to_string()) {
                return Err(format!(
                    "line {}: node {node} reuses the token of node {other}",
                    number + 1
                ));
            }
        }
        Ok(auth)
    }

    /// The node `token` belongs to.
    pub fn authenticate(&self, token: &str) -> Result<String, Refusal> {
        self.nodes_by_digest
            .get(&digest(token))
            .cloned()
            .ok_or_else(|| Refusal::unauthenticated("unknown node credential"))
    }
}

pub(super) fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_tokens_to_nodes() {
        let auth = NodeAuthenticator::parse(
            "# lab nodes\nnode-1 aaaaaaaaaaaaaaaaaaaa\n\nnode-2 bbbbbbbbbbbbbbbbbbbb\n",
        )
        .unwrap();
        assert_eq!(auth.authenticate("bbbbbbbbbbbbbbbbbbbb").unwrap(), "node-2");
        let refusal = auth.authenticate("cccccccccccccccccccc").unwrap_err();
        assert_eq!(refusal.status().code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn rejects_malformed_files() {
        assert!(
            NodeAuthenticator::parse("node-1")
                .unwrap_err()
                .contains("line 1")
        );
        assert!(
            NodeAuthenticator::parse("node-1 short")
                .unwrap_err()
                .contains("shorter")
        );
        let err =
            NodeAuthenticator::parse("a xxxxxxxxxxxxxxxxxx\nb xxxxxxxxxxxxxxxxxx").unwrap_err();
        assert!(err.contains("reuses"), "{err}");
    }
}
