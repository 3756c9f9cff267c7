//! An HTTP server that speaks the part of the Kubernetes API the control
//! plane uses, so the real kube-rs client and watcher code run against it:
//! lists with a resourceVersion (in pages, when asked), watches streamed as chunked JSON lines from
//! a resourceVersion, bookmarks, `410 Gone` for a compacted version, dropped
//! connections, and the TokenReview, Pod, Secret, ConfigMap, status and
//! Event endpoints, and single Namespaces and Pods.
//!
//! It keeps objects as JSON, as the API server serves them. Tests change
//! them with [`ApiServer::apply`] / [`ApiServer::delete`], which watches see
//! as events, and read what the control plane wrote with
//! [`ApiServer::object`] and [`ApiServer::requests`].

#![allow(dead_code)] // each test binary uses part of it

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

type Body = BoxBody<Bytes, Infallible>;

/// Collections that can be listed and watched, by path.
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const PODS: &str = "/api/v1/pods";
pub const SERVICES: &str = "/api/v1/services";
pub const POLICIES: &str = "/apis/security.kanava.io/v1alpha1/authorizationpolicies";
/// Only for single GETs (the CNI installer asks for its DaemonSet).
pub const DAEMONSETS: &str = "/apis/apps/v1/daemonsets";
pub const NODES: &str = "/api/v1/nodes";

#[derive(Default)]
struct State {
    revision: u64,
    /// Objects by collection path, then `namespace/name`.
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// Every change, for watches resuming from a version.
    history: Vec<(u64, &'static str, &'static str, Value)>,
    /// Watches from a version older than this get `410 Gone`.
    compacted: u64,
    /// Collections whose lists and watches answer 503 (the API server is
    /// "away" for them).
    unavailable: std::collections::HashSet<&'static str>,
    /// TokenReview answers (`status`) by token.
    reviews: HashMap<String, Value>,
    /// Secrets and ConfigMaps by `namespace/name`.
    secrets: BTreeMap<String, Value>,
    configmaps: BTreeMap<String, Value>,
    /// Secret creations answer 409 (another replica won) while set; the
    /// given Secret is stored instead, as the winner's.
    lose_secret_race: Option<Value>,
    /// Status patches and Events written, in order.
    status_patches: Vec<(String, Value)>,
    events: Vec<Value>,
    /// Every request, `METHOD path?query`.
    requests: Vec<String>,
    /// What the proxy to pods and services answers, by path.
    proxied: HashMap<String, String>,
    /// Requests whose path starts with one of these are never answered.
    hanging: Vec<String>,
    /// While set, every request answers 503: the API server is away.
    away: bool,
    /// While set, every request answers 401: the caller's credentials are
    /// dead (its service account deleted, its token expired).
    unauthorized: bool,
    /// Any other GET answered with a fixed JSON body, by path (OIDC
    /// discovery, for instance).
    documents: HashMap<String, Value>,
}

/// The server; it stops when dropped.
pub struct ApiServer {
    pub address: SocketAddr,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<()>,
    /// Dropping every sender of this ends every watch stream.
    cut: Arc<Mutex<broadcast::Sender<()>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ApiServer {
    pub async fn start() -> ApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut state = State {
            revision: 100,
            ..State::default()
        };
        for path in [NAMESPACES, PODS, SERVICES, POLICIES, DAEMONSETS, NODES] {
            state.objects.insert(path, BTreeMap::new());
        }
        let state = Arc::new(Mutex::new(state));
        let (changes, _) = broadcast::channel(1024);
        let cut = Arc::new(Mutex::new(broadcast::channel(1).0));
        let (served_state, served_changes, served_cut) =
            (state.clone(), changes.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (state, changes, cut) = (
                    served_state.clone(),
                    served_changes.clone(),
                    served_cut.clone(),
                );
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let (state, changes, cut) = (state.clone(), changes.clone(), cut.clone());
                        async move { Ok::<_, Infallible>(handle(request, state, changes, cut).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        ApiServer {
            address,
            state,
            changes,
            cut,
            task,
        }
    }

    /// A kubeconfig file pointing at this server.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{}\n\
                 users:\n- name: test\n  user:\n    token: test-token\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
                 current-context: test\n",
                self.address
            ),
        )
        .unwrap();
        path
    }

    /// A client of this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.address).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Adds or replaces an object of the collection `path`, as a watch event.
    pub fn apply(&self, path: &'static str, mut object: Value) {
        let mut state = self.lock();
        state.revision += 1;
        let revision = state.revision;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        let key = key_of(&object);
        let kind = if state.objects[path].contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state
            .objects
            .get_mut(path)
            .unwrap()
            .insert(key, object.clone());
        state.history.push((revision, path, kind, object));
        drop(state);
        let _ = self.changes.send(());
    }

    /// Deletes an object, as a watch event.
    pub fn delete(&self, path: &'static str, namespace: &str, name: &str) {
        let mut state = self.lock();
        let key = format!("{namespace}/{name}");
        if let Some(mut object) = state.objects.get_mut(path).unwrap().remove(&key) {
            state.revision += 1;
            let revision = state.revision;
            object["metadata"]["resourceVersion"] = json!(revision.to_string());
            state.history.push((revision, path, "DELETED", object));
        }
        drop(state);
        let _ = self.changes.send(());
    }

    /// Forgets history: watches resuming from an older version get `410`.
    pub fn compact(&self) {
        let mut state = self.lock();
        state.compacted = state.revision;
        state.history.clear();
    }

    /// Ends every watch stream now (a dropped connection).
    pub fn cut_watches(&self) {
        let mut cut = self.cut.lock().unwrap();
        *cut = broadcast::channel(1).0;
    }

    /// Requests whose path starts with `prefix` are never answered (a
    /// server that accepted the connection and went silent).
    pub fn hang(&self, prefix: &str) {
        self.state.lock().unwrap().hanging.push(prefix.to_string());
    }

    /// While set, every request answers 401, as to a token whose service
    /// account is gone.
    pub fn set_unauthorized(&self, unauthorized: bool) {
        self.state.lock().unwrap().unauthorized = unauthorized;
    }

    /// While set, every request answers 503, as an API server that is away
    /// behind its load balancer; open watches end.
    pub fn set_away(&self, away: bool) {
        self.state.lock().unwrap().away = away;
        if away {
            self.cut_watches();
        }
    }

    /// Answers GETs of `path` with `document`.
    pub fn document(&self, path: &str, document: Value) {
        self.state
            .lock()
            .unwrap()
            .documents
            .insert(path.to_string(), document);
    }

    /// While set, lists and new watches of `path` answer 503.
    pub fn set_unavailable(&self, path: &'static str, unavailable: bool) {
        let mut state = self.lock();
        if unavailable {
            state.unavailable.insert(path);
        } else {
            state.unavailable.remove(path);
        }
    }

    /// Every object of every collection, as served.
    pub fn all_objects(&self) -> Vec<Value> {
        self.lock()
            .objects
            .values()
            .flat_map(|objects| objects.values().cloned())
            .collect()
    }

    /// What a TokenReview of `token` answers (its `status`).
    pub fn review(&self, token: &str, status: Value) {
        self.lock().reviews.insert(token.to_string(), status);
    }

    pub fn put_secret(&self, namespace: &str, secret: Value) {
        let name = secret["metadata"]["name"].as_str().unwrap().to_string();
        self.lock()
            .secrets
            .insert(format!("{namespace}/{name}"), secret);
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .secrets
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    pub fn configmap(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .configmaps
            .get(&format!("{namespace}/{name}"))
            .cloned()
    }

    /// Make the next Secret creation lose a race to `winner`.
    pub fn lose_secret_race(&self, winner: Value) {
        self.lock().lose_secret_race = Some(winner);
    }

    pub fn status_patches(&self) -> Vec<(String, Value)> {
        self.lock().status_patches.clone()
    }

    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    /// Makes the API server's proxy answer `path` with `body`.
    pub fn proxy(&self, path: &str, body: &str) {
        self.lock()
            .proxied
            .insert(path.to_string(), body.to_string());
    }

    pub fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }
}

fn key_of(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("")
    )
}

fn json_response(status: StatusCode, body: Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn query(request: &Request<hyper::body::Incoming>) -> HashMap<String, String> {
    request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| {
            let v = v
                .replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/");
            (k.to_string(), v)
        })
        .collect()
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<()>,
    cut: Arc<Mutex<broadcast::Sender<()>>>,
) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = query(&request);
    state.lock().unwrap().requests.push(format!(
        "{method} {path}?{}",
        request.uri().query().unwrap_or("")
    ));
    let body: Value = {
        let bytes = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (hangs, away, unauthorized) = {
        let state = state.lock().unwrap();
        (
            state.hanging.iter().any(|prefix| path.starts_with(prefix)),
            state.away,
            state.unauthorized,
        )
    };
    if hangs {
        std::future::pending::<()>().await;
    }
    if away {
        return status(503, "ServiceUnavailable", "the API server is away");
    }
    if unauthorized {
        return status(401, "Unauthorized", "Unauthorized");
    }
    if method == Method::GET
        && let Some(document) = state.lock().unwrap().documents.get(&path)
    {
        return json_response(StatusCode::OK, document.clone());
    }

    // The API server's proxy to pods and services (`.../pods/NAME:PORT/proxy/...`):
    // what a test put there.
    if path.contains("/proxy/") && method == Method::GET {
        return match state.lock().unwrap().proxied.get(&path) {
            Some(body) => Response::new(Full::new(Bytes::from(body.clone())).boxed()),
            None => status(503, "ServiceUnavailable", "no endpoints available"),
        };
    }
    for collection in [NAMESPACES, PODS, SERVICES, POLICIES, NODES] {
        if path == collection && method == Method::GET {
            if state.lock().unwrap().unavailable.contains(collection) {
                return status(503, "ServiceUnavailable", "the server is shutting down");
            }
            return if query.get("watch").map(String::as_str) == Some("true") {
                watch(collection, &query, state, changes, cut)
            } else {
                list(collection, &query, &state)
            };
        }
    }
    let mut state = state.lock().unwrap();
    match (method, segments.as_slice()) {
        (Method::POST, ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => {
            let token = body["spec"]["token"].as_str().unwrap_or("");
            let answer = state.reviews.get(token).cloned().unwrap_or_else(
                || json!({"authenticated": false, "error": "invalid bearer token"}),
            );
            if answer == json!("error") {
                return status(500, "InternalError", "etcd is unhappy");
            }
            let mut review = body.clone();
            review["status"] = answer;
            json_response(StatusCode::CREATED, review)
        }
        (Method::GET, ["api", "v1", "namespaces", name]) => {
            match state.objects[NAMESPACES].get(&format!("/{name}")) {
                Some(namespace) => json_response(StatusCode::OK, namespace.clone()),
                None => status(404, "NotFound", &format!("namespaces \"{name}\" not found")),
            }
        }
        (Method::GET, ["apis", "apps", "v1", "namespaces", ns, "daemonsets", name]) => {
            match state.objects[DAEMONSETS].get(&format!("{ns}/{name}")) {
                Some(daemonset) => json_response(StatusCode::OK, daemonset.clone()),
                None => status(
                    404,
                    "NotFound",
                    &format!("daemonsets.apps \"{name}\" not found"),
                ),
            }
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "services", name]) => {
            match state.objects[SERVICES].get(&format!("{ns}/{name}")) {
                Some(service) => json_response(StatusCode::OK, service.clone()),
                None => status(404, "NotFound", &format!("services \"{name}\" not found")),
            }
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => {
            // A label selector of `key=value` pairs.
            let wanted: Vec<(String, String)> = query
                .get("labelSelector")
                .map(|s| {
                    s.split(',')
                        .filter_map(|p| p.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let items: Vec<Value> = state.objects[PODS]
                .iter()
                .filter(|(key, _)| key.starts_with(&format!("{ns}/")))
                .map(|(_, pod)| pod.clone())
                .filter(|pod| {
                    wanted
                        .iter()
                        .all(|(k, v)| pod["metadata"]["labels"][k.as_str()] == v.as_str())
                })
                .collect();
            json_response(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "PodList",
                       "metadata": {"resourceVersion": state.revision.to_string()}, "items": items}),
            )
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            match state.objects[PODS].get(&format!("{ns}/{name}")) {
                Some(pod) => json_response(StatusCode::OK, pod.clone()),
                None => status(404, "NotFound", &format!("pods \"{name}\" not found")),
            }
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "secrets", name]) => {
            match state.secrets.get(&format!("{ns}/{name}")) {
                Some(secret) => json_response(StatusCode::OK, secret.clone()),
                None => status(404, "NotFound", &format!("secrets \"{name}\" not found")),
            }
        }
        (Method::POST, ["api", "v1", "namespaces", ns, "secrets"]) => {
            let name = body["metadata"]["name"].as_str().unwrap_or("").to_string();
            let key = format!("{ns}/{name}");
            if let Some(winner) = state.lose_secret_race.take() {
                state.secrets.insert(key, winner);
                return status(
                    409,
                    "AlreadyExists",
                    &format!("secrets \"{name}\" already exists"),
                );
            }
            if state.secrets.contains_key(&key) {
                return status(
                    409,
                    "AlreadyExists",
                    &format!("secrets \"{name}\" already exists"),
                );
            }
            state.secrets.insert(key, body.clone());
            json_response(StatusCode::CREATED, body)
        }
        (Method::PATCH, ["api", "v1", "namespaces", ns, "configmaps", name]) => {
            state
                .configmaps
                .insert(format!("{ns}/{name}"), body.clone());
            json_response(StatusCode::OK, body)
        }
        (
            Method::PATCH,
            [
                "apis",
                "security.kanava.io",
                "v1alpha1",
                "namespaces",
                ns,
                "authorizationpolicies",
                name,
                "status",
            ],
        ) => {
            let key = format!("{ns}/{name}");
            state.status_patches.push((key.clone(), body.clone()));
            match state.objects.get_mut(POLICIES).unwrap().get_mut(&key) {
                Some(object) => {
                    object["status"] = body["status"].clone();
                    json_response(StatusCode::OK, object.clone())
                }
                None => status(404, "NotFound", "not found"),
            }
        }
        (Method::POST, ["apis", "events.k8s.io", "v1", "namespaces", _, "events"]) => {
            state.events.push(body.clone());
            json_response(StatusCode::CREATED, body)
        }
        (Method::PATCH, ["apis", "events.k8s.io", "v1", "namespaces", _, "events", _]) => {
            json_response(StatusCode::OK, body)
        }
        _ => status(404, "NotFound", &format!("no route for {path}")),
    }
}

fn list_kind(collection: &str) -> (&'static str, &'static str) {
    match collection {
        NAMESPACES => ("v1", "Namespace"),
        PODS => ("v1", "Pod"),
        SERVICES => ("v1", "Service"),
        NODES => ("v1", "Node"),
        _ => ("security.kanava.io/v1alpha1", "AuthorizationPolicy"),
    }
}

/// A list, in pages when asked (`limit`): each page but the last carries a
/// `continue` token (the hex of the last key served), as the API server's.
fn list(
    collection: &'static str,
    query: &HashMap<String, String>,
    state: &Arc<Mutex<State>>,
) -> Response<Body> {
    let state = state.lock().unwrap();
    let (api_version, kind) = list_kind(collection);
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0)
        .unwrap_or(usize::MAX);
    let after = query.get("continue").map(|token| {
        let bytes: Vec<u8> = (0..token.len() / 2)
            .filter_map(|i| u8::from_str_radix(&token[2 * i..2 * i + 2], 16).ok())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let objects = &state.objects[collection];
    let mut remaining = match &after {
        Some(after) => objects
            .range::<String, _>((
                std::ops::Bound::Excluded(after.clone()),
                std::ops::Bound::Unbounded,
            ))
            .peekable(),
        None => objects.range::<String, _>(..).peekable(),
    };
    let mut items = Vec::new();
    let mut last = None;
    while items.len() < limit {
        let Some((key, object)) = remaining.next() else {
            break;
        };
        items.push(object.clone());
        last = Some(key);
    }
    let mut metadata = json!({"resourceVersion": state.revision.to_string()});
    if let (Some(last), Some(_)) = (last, remaining.peek()) {
        let token: String = last.bytes().map(|b| format!("{b:02x}")).collect();
        metadata["continue"] = json!(token);
    }
    json_response(
        StatusCode::OK,
        json!({"apiVersion": api_version, "kind": format!("{kind}List"),
               "metadata": metadata, "items": items}),
    )
}

/// A watch: every change after `resourceVersion`, then new ones as they
/// happen, as chunked JSON lines; a bookmark once caught up; `410 Gone` as
/// an ERROR event when the version is compacted away.
fn watch(
    collection: &'static str,
    query: &HashMap<String, String>,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<()>,
    cut: Arc<Mutex<broadcast::Sender<()>>>,
) -> Response<Body> {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let mut changed = changes.subscribe();
    let mut cut = cut.lock().unwrap().subscribe();
    tokio::spawn(async move {
        let line = |value: Value| Ok(Frame::data(Bytes::from(format!("{value}\n"))));
        let compacted = state.lock().unwrap().compacted;
        if from < compacted {
            let _ = tx
                .send(line(
                    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
                    "status": "Failure", "reason": "Expired", "code": 410,
                    "message": format!("too old resource version: {from} ({compacted})")}}),
                ))
                .await;
            return;
        }
        let mut sent = from;
        let mut bookmarked = false;
        loop {
            let (events, revision) = {
                let state = state.lock().unwrap();
                let events: Vec<(u64, &str, Value)> = state
                    .history
                    .iter()
                    .filter(|(revision, path, _, _)| *path == collection && *revision > sent)
                    .map(|(revision, _, kind, object)| (*revision, *kind, object.clone()))
                    .collect();
                (events, state.revision)
            };
            for (revision, kind, object) in events {
                if tx
                    .send(line(json!({"type": kind, "object": object})))
                    .await
                    .is_err()
                {
                    return;
                }
                sent = revision;
            }
            if bookmarks && !bookmarked {
                let (api_version, kind) = list_kind(collection);
                let bookmark = json!({"type": "BOOKMARK", "object": {"apiVersion": api_version,
                    "kind": kind, "metadata": {"resourceVersion": revision.to_string()}}});
                if tx.send(line(bookmark)).await.is_err() {
                    return;
                }
                bookmarked = true;
            }
            tokio::select! {
                _ = changed.recv() => {}
                _ = cut.recv() => return,
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

/// Loads a JSON array of objects from `tests/data`.
pub fn golden(file: &str) -> Vec<Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Serves every golden object.
pub fn serve_golden(server: &ApiServer) {
    for (file, path) in [
        ("namespaces.json", NAMESPACES),
        ("pods.json", PODS),
        ("services.json", SERVICES),
        ("authorizationpolicies.json", POLICIES),
    ] {
        for object in golden(file) {
            server.apply(path, object);
        }
    }
}
