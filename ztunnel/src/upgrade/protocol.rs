//! The messages on the upgrade socket, one JSON document per
//! `SOCK_SEQPACKET` packet, an app socket attached (SCM_RIGHTS) to each
//! moved connection.
//!
//! ```text
//!  anyone ── Hello ──────────────► successor ── Status (pid, ready, last hand-over)
//!  predecessor ── HandOver (pods) ► successor ── Proceed   (it serves those pods now)
//!  predecessor ── Client / Server + fd (one per moved connection) ►
//!  predecessor ── Done (summary) ─► successor ── Status
//! ```
//!
//! Only root (or the configured handoff user) may connect: the socket
//! carries live connections.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::proxy::hbone::resume::Token;
use crate::proxy::resumptions::Parked;

/// One message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum Message {
    /// Who are you? Answered with [`Message::Status`].
    Hello { pid: u32 },
    /// The successor's answer.
    Status {
        pid: u32,
        ready: bool,
        #[serde(default, rename = "lastHandOver")]
        last_hand_over: Option<Summary>,
    },
    /// A predecessor is leaving and serves these pods (uids).
    HandOver { pid: u32, pods: Vec<String> },
    /// The successor serves them too: the predecessor may close its
    /// listeners.
    Proceed { listeners: u64 },
    /// An outbound connection whose stream moved; its client's socket is
    /// attached.
    Client(MovedClient),
    /// An inbound connection whose stream moved; its app socket is attached.
    Server(MovedServer),
    /// Everything movable has been handed over.
    Done(Summary),
}

/// What a successor needs to resume an outbound connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MovedClient {
    pub pod_uid: String,
    pub token: String,
    /// Where the app connected (its original destination).
    pub original_destination: SocketAddr,
    /// The `CONNECT` target (the endpoint chosen, with its target port).
    pub target: SocketAddr,
    /// The destination's identity, as a SPIFFE ID.
    pub destination_identity: String,
    /// The app's own address.
    pub peer: SocketAddr,
    pub from_app_ended: bool,
    pub to_app_ended: bool,
}

/// What a successor needs to park an inbound connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MovedServer {
    pub pod_uid: String,
    pub token: String,
    pub client_identity: String,
    pub client_address: SocketAddr,
    pub target: SocketAddr,
    pub from_app_ended: bool,
    pub to_app_ended: bool,
}

impl MovedServer {
    /// The message that hands a parked stream to the successor.
    pub fn of(token: Token, parked: &Parked) -> MovedServer {
        MovedServer {
            pod_uid: parked.binding.pod_uid.clone(),
            token: token.to_string(),
            client_identity: parked.binding.client.to_string(),
            client_address: parked.client_address,
            target: parked.binding.target,
            from_app_ended: parked.from_app_ended,
            to_app_ended: parked.to_app_ended,
        }
    }
}

/// How a hand-over went, as the predecessor saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Summary {
    pub predecessor_pid: u32,
    /// Pod listeners closed by the predecessor while the successor's
    /// listened beside them (pending connections migrate in the kernel).
    pub listeners: u64,
    /// Connections whose streams moved to the successor.
    pub moved: u64,
    /// Connections that could not move and are drained by the predecessor.
    pub drained: u64,
    /// From the predecessor's SIGTERM to the last connection handed over.
    pub elapsed_ms: u64,
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        // Serialising these plain structures cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A token from a message, or why not.
pub fn token(text: &str) -> Result<Token, String> {
    Token::parse(text.as_bytes()).ok_or_else(|| "not a resume token".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_back_as_themselves() {
        let messages = [
            Message::Hello { pid: 7 },
            Message::Status {
                pid: 8,
                ready: true,
                last_hand_over: Some(Summary {
                    predecessor_pid: 7,
                    listeners: 6,
                    moved: 200,
                    drained: 1,
                    elapsed_ms: 120,
                }),
            },
            Message::HandOver {
                pid: 7,
                pods: vec!["uid-1".into()],
            },
            Message::Proceed { listeners: 3 },
            Message::Client(MovedClient {
                pod_uid: "uid-1".into(),
                token: Token::random().to_string(),
                original_destination: "10.96.0.10:80".parse().expect("address"),
                target: "10.244.2.3:8080".parse().expect("address"),
                destination_identity: "spiffe://cluster.local/ns/shop/sa/web".into(),
                peer: "10.244.1.2:40000".parse().expect("address"),
                from_app_ended: false,
                to_app_ended: true,
            }),
            Message::Server(MovedServer {
                pod_uid: "uid-2".into(),
                token: Token::random().to_string(),
                client_identity: "spiffe://cluster.local/ns/shop/sa/client".into(),
                client_address: "10.244.1.2:40000".parse().expect("address"),
                target: "10.244.2.3:8080".parse().expect("address"),
                from_app_ended: true,
                to_app_ended: false,
            }),
            Message::Done(Summary::default()),
        ];
        for message in messages {
            assert_eq!(
                Message::decode(&message.encode()).expect("decodes"),
                message
            );
        }
    }

    #[test]
    fn unknown_messages_and_fields_are_refused() {
        for bad in [
            &br#"{"kind":"takeEverything"}"#[..],
            br#"{"kind":"hello","pid":1,"extra":true}"#,
            br#"{"kind":"hello","pid":-1}"#,
            b"",
            b"\xff",
        ] {
            assert!(Message::decode(bad).is_err(), "{bad:?}");
        }
        assert!(token("not-a-token").is_err());
    }
}
