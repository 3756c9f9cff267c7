//! The server side's resume tokens: which inbound streams may move, which
//! have moved and wait for their client to come back, and who may claim
//! them ([`hbone::resume`](super::hbone::resume) has the wire side).
//!
//! A token is issued when a stream is accepted with the extension. It can
//! be claimed only once its stream is parked (both sides stopped, the app
//! socket set aside), only within [`PARK_TTL`], only once, and only by the
//! client identity it was issued to, for the same pod and target. A claim
//! for a stream that is still moving, or for an unknown token while a
//! predecessor is still handing its parked streams over, waits a little for
//! it; anything else is refused at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kanava_mesh::Identity;
use tokio::sync::Notify;

use super::hbone::resume::{PARK_TTL, Token};

/// Who may resume a stream, and to where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The pod whose :15008 the stream came in on.
    pub pod_uid: String,
    /// The client's proven identity.
    pub client: Identity,
    /// The `CONNECT` target (the app's address in the pod).
    pub target: SocketAddr,
}

/// A moved stream's app socket, set aside until its client comes back.
#[derive(Debug)]
pub struct Parked {
    pub binding: Binding,
    pub tcp: std::net::TcpStream,
    /// The HBONE client's address the app saw as its peer.
    pub client_address: SocketAddr,
    /// The app had finished sending before the move.
    pub from_app_ended: bool,
    /// The client had finished sending (FIN passed to the app) before it.
    pub to_app_ended: bool,
    pub since: Instant,
}

enum Slot {
    /// Its stream runs (or is moving): not claimable yet.
    Live(Binding),
    Parked(Parked),
}

/// Why a resume was refused; each is logged and counted by its code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResumeRefusal {
    #[error("resume token unknown (forged, or its stream never moved here)")]
    Unknown,
    #[error("resume token already used")]
    Replayed,
    #[error("resume token issued to another client, pod or target: {0}")]
    Foreign(String),
    #[error("resume token's stream is not parked (still running)")]
    NotParked,
}

impl ResumeRefusal {
    pub fn code(&self) -> &'static str {
        match self {
            ResumeRefusal::Unknown => "unknown",
            ResumeRefusal::Replayed => "replayed",
            ResumeRefusal::Foreign(_) => "foreign",
            ResumeRefusal::NotParked => "not_parked",
        }
    }
}

#[derive(Default)]
struct Table {
    slots: HashMap<Token, Slot>,
    /// Tokens claimed or expired lately: a second claim is a replay.
    spent: HashMap<Token, Instant>,
    /// Until when parked streams may still arrive from a predecessor.
    incoming_until: Option<Instant>,
}

#[derive(Default)]
pub struct Resumptions {
    table: Mutex<Table>,
    changed: Notify,
}

impl Resumptions {
    /// A token for a stream just accepted with the extension.
    pub fn issue(&self, binding: Binding) -> Token {
        let token = Token::random();
        self.lock().slots.insert(token, Slot::Live(binding));
        token
    }

    /// The stream of `token` ended without moving (or moved on to a
    /// successor): a claim waiting for it is answered at once.
    pub fn forget(&self, token: Token) {
        self.lock().slots.remove(&token);
        self.changed.notify_waiters();
    }

    /// Sets a moved stream aside for its client (from this ztunnel's own
    /// streams, or handed over by a predecessor).
    pub fn park(&self, token: Token, parked: Parked) {
        self.lock().slots.insert(token, Slot::Parked(parked));
        self.changed.notify_waiters();
    }

    /// A predecessor is handing parked streams over until `until`: claims
    /// of tokens not known yet wait for them until then.
    pub fn expect_incoming(&self, until: Option<Instant>) {
        self.lock().incoming_until = until;
        self.changed.notify_waiters();
    }

    /// Takes the parked stream of `token` for `claimant`, waiting up to
    /// `wait` for one that is still moving or still being handed over.
    pub async fn claim(
        &self,
        token: Token,
        claimant: &Binding,
        wait: Duration,
    ) -> Result<Parked, ResumeRefusal> {
        let deadline = Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let waiting = {
                let mut table = self.lock();
                let now = Instant::now();
                match table.slots.get(&token) {
                    Some(Slot::Parked(parked)) => {
                        if parked.binding != *claimant {
                            return Err(ResumeRefusal::Foreign(describe_mismatch(
                                &parked.binding,
                                claimant,
                            )));
                        }
                        if let Some(Slot::Parked(parked)) = table.slots.remove(&token) {
                            table.spent.insert(token, now);
                            return Ok(parked);
                        }
                        return Err(ResumeRefusal::Unknown);
                    }
                    Some(Slot::Live(binding)) => {
                        if binding != claimant {
                            return Err(ResumeRefusal::Foreign(describe_mismatch(
                                binding, claimant,
                            )));
                        }
                        ResumeRefusal::NotParked
                    }
                    None if table.spent.contains_key(&token) => {
                        return Err(ResumeRefusal::Replayed);
                    }
                    None if table.incoming_until.is_some_and(|until| until > now) => {
                        ResumeRefusal::Unknown
                    }
                    None => return Err(ResumeRefusal::Unknown),
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(waiting);
            }
            let _ = tokio::time::timeout(deadline - now, changed).await;
        }
    }

    /// Drops streams parked for longer than [`PARK_TTL`] (their app
    /// connections are reset: nobody came back for them) and forgets spent
    /// tokens after as long. Returns how many parked streams were dropped.
    pub fn expire(&self) -> usize {
        let now = Instant::now();
        let mut table = self.lock();
        let mut expired = Vec::new();
        table.slots.retain(|token, slot| match slot {
            Slot::Parked(parked) if now.duration_since(parked.since) >= PARK_TTL => {
                // A reset, not a FIN the app could take for a clean end.
                let _ = socket2::SockRef::from(&parked.tcp).set_linger(Some(Duration::ZERO));
                expired.push(*token);
                false
            }
            _ => true,
        });
        for token in &expired {
            table.spent.insert(*token, now);
        }
        table
            .spent
            .retain(|_, at| now.duration_since(*at) < PARK_TTL * 2);
        expired.len()
    }

    /// Takes every parked stream out (to hand them to a successor).
    pub fn take_parked(&self) -> Vec<(Token, Parked)> {
        let mut table = self.lock();
        let tokens: Vec<Token> = table
            .slots
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Parked(_)))
            .map(|(token, _)| *token)
            .collect();
        tokens
            .into_iter()
            .filter_map(|token| match table.slots.remove(&token) {
                Some(Slot::Parked(parked)) => Some((token, parked)),
                _ => None,
            })
            .collect()
    }

    /// Streams parked now.
    pub fn parked(&self) -> usize {
        self.lock()
            .slots
            .values()
            .filter(|slot| matches!(slot, Slot::Parked(_)))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn describe_mismatch(issued: &Binding, claimant: &Binding) -> String {
    let mut differences = Vec::new();
    if issued.client != claimant.client {
        differences.push(format!(
            "issued to {}, claimed by {}",
            issued.client, claimant.client
        ));
    }
    if issued.pod_uid != claimant.pod_uid {
        differences.push("for another pod".to_string());
    }
    if issued.target != claimant.target {
        differences.push(format!(
            "for target {}, claimed for {}",
            issued.target, claimant.target
        ));
    }
    differences.join("; ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Arc;

    use super::*;

    fn binding(sa: &str) -> Binding {
        Binding {
            pod_uid: "web-uid".into(),
            client: Identity::new("cluster.local", "shop", sa).expect("identity"),
            target: "10.244.2.3:8080".parse().expect("address"),
        }
    }

    fn parked(binding: Binding) -> Parked {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        Parked {
            binding,
            tcp,
            client_address: "10.244.1.2:40000".parse().unwrap(),
            from_app_ended: false,
            to_app_ended: false,
            since: Instant::now(),
        }
    }

    const NO_WAIT: Duration = Duration::ZERO;

    #[tokio::test]
    async fn a_parked_stream_is_claimed_once_by_its_client() {
        let table = Resumptions::default();
        let token = table.issue(binding("client"));
        assert_eq!(
            table.claim(token, &binding("client"), NO_WAIT).await.err(),
            Some(ResumeRefusal::NotParked),
            "a running stream cannot be taken over"
        );
        table.park(token, parked(binding("client")));
        assert!(matches!(
            table.claim(token, &binding("intruder"), NO_WAIT).await,
            Err(ResumeRefusal::Foreign(why)) if why.contains("intruder")
        ));
        let claimed = table.claim(token, &binding("client"), NO_WAIT).await;
        assert!(
            claimed.is_ok(),
            "a foreign claim does not spend the token: {claimed:?}"
        );
        assert_eq!(
            table.claim(token, &binding("client"), NO_WAIT).await.err(),
            Some(ResumeRefusal::Replayed)
        );
        assert_eq!(
            table
                .claim(Token::random(), &binding("client"), NO_WAIT)
                .await
                .err(),
            Some(ResumeRefusal::Unknown)
        );
    }

    #[tokio::test]
    async fn another_target_or_pod_is_foreign() {
        let table = Resumptions::default();
        let token = table.issue(binding("client"));
        table.park(token, parked(binding("client")));
        let mut other_target = binding("client");
        other_target.target = "10.244.2.3:9090".parse().unwrap();
        let mut other_pod = binding("client");
        other_pod.pod_uid = "db-uid".into();
        for claimant in [other_target, other_pod] {
            assert!(matches!(
                table.claim(token, &claimant, NO_WAIT).await,
                Err(ResumeRefusal::Foreign(_))
            ));
        }
    }

    #[tokio::test]
    async fn a_claim_waits_for_a_stream_still_moving_or_still_handed_over() {
        let table = Arc::new(Resumptions::default());
        let token = table.issue(binding("client"));
        let parking = table.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            parking.park(token, parked(binding("client")));
        });
        table
            .claim(token, &binding("client"), Duration::from_secs(5))
            .await
            .expect("parked while the claim waited");

        // An unknown token waits only while a predecessor hands over.
        let from_predecessor = Token::random();
        table.expect_incoming(Some(Instant::now() + Duration::from_secs(5)));
        let parking = table.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            parking.park(from_predecessor, parked(binding("client")));
        });
        table
            .claim(from_predecessor, &binding("client"), Duration::from_secs(5))
            .await
            .expect("handed over while the claim waited");
        table.expect_incoming(None);
        let started = Instant::now();
        assert_eq!(
            table
                .claim(Token::random(), &binding("client"), Duration::from_secs(5))
                .await
                .err(),
            Some(ResumeRefusal::Unknown)
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a forged token is refused at once"
        );
    }

    #[tokio::test]
    async fn nothing_stays_parked_forever() {
        let table = Resumptions::default();
        let token = table.issue(binding("client"));
        let mut stale = parked(binding("client"));
        stale.since = Instant::now() - PARK_TTL;
        table.park(token, stale);
        assert_eq!(table.parked(), 1);
        assert_eq!(table.expire(), 1);
        assert_eq!(table.parked(), 0);
        assert_eq!(
            table.claim(token, &binding("client"), NO_WAIT).await.err(),
            Some(ResumeRefusal::Replayed),
            "an expired token is spent"
        );
    }
}
