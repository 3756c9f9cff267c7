//! Micro-benchmarks of the per-connection hot paths:
//!
//! - deciding a new connection's route (to a pod, to a Service) among
//!   1,000 and among 100,000 pods, and applying the cluster's state whole
//!   or one changed pod;
//! - deciding a connection against 1,000 authorization policies;
//! - the copy loop between a TCP stream and an HTTP/2 CONNECT stream;
//! - the mutual TLS handshake of a new HBONE connection, CPU only.
//!
//! `cargo bench -p kanava-benches --bench micro`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kanava_mesh::policy::{
    Action, Connection, Policy, PolicySet, Rule, SourceBuilder, destination,
};
use kanava_mesh::{Endpoint, Identity, Service, ServicePort, TunnelProtocol, Workload};
use kanava_proto::v1 as pb;
use kanava_ztunnel::proxy::PodInfo;
use kanava_ztunnel::proxy::hbone;
use kanava_ztunnel::proxy::route::route;
use kanava_ztunnel::workloads::WorkloadStore;

/// Counts the bytes this process holds on the heap, to tell what a
/// ztunnel's workload store holds at 1,000 and 100,000 pods. One relaxed
/// atomic add per allocation, in every benchmark alike.
struct Counting;

static HELD: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

// SAFETY: every call goes to the system allocator unchanged; only a counter
// is updated beside it. (A global allocator cannot be written without
// `unsafe`; this is the only one in the workspace, and only in a benchmark.)
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as it is.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        HELD.fetch_sub(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(
            new_size as isize - layout.size() as isize,
            std::sync::atomic::Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn held() -> isize {
    HELD.load(std::sync::atomic::Ordering::Relaxed)
}
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

/// A cluster as a ztunnel's discovery sees it: `workloads` pods over 100
/// namespaces, Services at a fifth of them (five endpoints each).
fn cluster(workloads: u32) -> Vec<pb::Resource> {
    let workload = |i: u32| Workload {
        uid: format!("uid-{i}"),
        name: format!("pod-{i}"),
        namespace: format!("ns-{}", i % 100),
        service_account: "default".into(),
        node: format!("node-{}", i % 1000),
        ips: vec![ip(i)],
        identity: Identity::new("cluster.local", format!("ns-{}", i % 100), "default").unwrap(),
        protocol: TunnelProtocol::Hbone,
        labels: std::sync::Arc::new([("app".to_string(), format!("app-{}", i / 5))].into()),
        mtls_mode: Default::default(),
        resource_version: "1".into(),
        plaintext_inbound_ports: Vec::new(),
    };
    let service = |s: u32| Service {
        namespace: format!("ns-{}", (s * 5) % 100),
        name: format!("svc-{s}"),
        addresses: vec![service_ip(s)],
        ports: vec![ServicePort {
            port: 80,
            target_port: 8080,
            target_port_name: String::new(),
        }],
        endpoints: (s * 5..s * 5 + 5)
            .map(|i| Endpoint {
                workload_uid: format!("uid-{i}"),
                ports: [(80, 8080)].into(),
            })
            .collect(),
        resource_version: "1".into(),
    };
    let workloads_resources = (0..workloads).map(|i| {
        let w = workload(i);
        pb::Resource {
            name: w.resource_name(),
            kind: Some(pb::resource::Kind::Workload(w.to_proto())),
        }
    });
    let services = (0..workloads / 5).map(|s| {
        let service = service(s);
        pb::Resource {
            name: service.resource_name(),
            kind: Some(pb::resource::Kind::Service(service.to_proto())),
        }
    });
    workloads_resources.chain(services).collect()
}

fn service_ip(s: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + s))
}

fn snapshot(resources: Vec<pb::Resource>) -> pb::DiscoveryResponse {
    pb::DiscoveryResponse {
        version_info: "1".into(),
        full_snapshot: true,
        resources,
        ..Default::default()
    }
}

/// The cost per new connection of deciding its route (a pod's address, a
/// Service's), in a cluster of 1,000 and of 100,000 pods: it must not grow
/// with the cluster. Then what a ztunnel pays when the cluster's state
/// arrives whole, and when one pod changes in it.
fn cluster_state(c: &mut Criterion) {
    let source = PodInfo {
        uid: "uid-client".into(),
        name: "client".into(),
        namespace: "ns-0".into(),
        identity: Identity::new("cluster.local", "ns-0", "client").unwrap(),
        ips: vec![IpAddr::V4(Ipv4Addr::new(10, 255, 0, 1))],
    };
    let mut group = c.benchmark_group("route per new connection");
    for workloads in [1_000u32, 100_000] {
        let full = snapshot(cluster(workloads));
        let before = held();
        let store = WorkloadStore::new();
        store.apply(&full).unwrap();
        drop(full);
        let bytes = held() - before;
        println!(
            "workload store holding {workloads} workloads and {} Services: {:.1} MiB \
             ({} bytes a workload, its Service's share included)",
            workloads / 5,
            bytes as f64 / (1024.0 * 1024.0),
            bytes / workloads as isize
        );
        let label = format!("{}k workloads", workloads / 1000);
        let mut i = 0u32;
        group.bench_function(BenchmarkId::new("to a pod", &label), |b| {
            b.iter(|| {
                i = (i + 7919) % workloads;
                black_box(route(&store, &source, SocketAddr::new(ip(i), 8080)))
            })
        });
        if workloads > 1_000 {
            // A node's pods talk to some destinations, not to all of the
            // cluster at random: the same work as above, over 1,000 of the
            // 100,000 (what stays in the CPU's caches is what differs).
            let mut i = 0u32;
            group.bench_function(BenchmarkId::new("to a pod, 1k destinations", &label), |b| {
                b.iter(|| {
                    i = (i + 7919) % 1_000;
                    black_box(route(&store, &source, SocketAddr::new(ip(i * 97), 8080)))
                })
            });
        }
        let mut s = 0u32;
        group.bench_function(BenchmarkId::new("to a Service", &label), |b| {
            b.iter(|| {
                s = (s + 31) % (workloads / 5);
                black_box(route(&store, &source, SocketAddr::new(service_ip(s), 80)))
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("discovery applied");
    group.sample_size(10);
    for workloads in [1_000u32, 100_000] {
        let label = format!("{}k workloads", workloads / 1000);
        let full = snapshot(cluster(workloads));
        let store = WorkloadStore::new();
        group.bench_function(BenchmarkId::new("full snapshot", &label), |b| {
            b.iter(|| store.apply(black_box(&full)).unwrap())
        });
        // One pod's labels change: a delta of one resource.
        let mut changed = cluster(1).remove(0);
        if let Some(pb::resource::Kind::Workload(w)) = changed.kind.as_mut() {
            w.labels.insert("version".into(), "v2".into());
        }
        let delta = pb::DiscoveryResponse {
            version_info: "2".into(),
            full_snapshot: false,
            resources: vec![changed],
            ..Default::default()
        };
        group.bench_function(BenchmarkId::new("one pod changed", &label), |b| {
            b.iter(|| store.apply(black_box(&delta)).unwrap())
        });
    }
    group.finish();
}

fn policy_evaluation(c: &mut Criterion) {
    let empty: [&str; 0] = [];
    let mut policies = Vec::new();
    for i in 0..1000 {
        let namespace = format!("ns-{}", i % 100);
        let principal = format!("cluster.local/ns/ns-{}/sa/sa-{i}", (i + 1) % 100);
        let principals = [principal.as_str()];
        let source = SourceBuilder {
            principals: &principals[..],
            not_principals: &empty[..],
            namespaces: &empty[..],
            not_namespaces: &empty[..],
            ip_blocks: &empty[..],
            not_ip_blocks: &empty[..],
        }
        .build()
        .unwrap();
        policies.push(Arc::new(Policy {
            namespace: if i % 100 == 99 {
                "kanava-system".into()
            } else {
                namespace
            },
            name: format!("policy-{i}"),
            selector: Some([("app".to_string(), format!("app-{}", i % 7))].into()),
            mesh_wide: i % 100 == 99,
            action: if i % 3 == 0 {
                Action::Deny
            } else {
                Action::Allow
            },
            rules: vec![Rule {
                from: vec![source],
                to: vec![destination(&[8080, 9090], &[]).unwrap()],
            }],
            resource_version: "1".into(),
        }));
    }
    let set = PolicySet::new(policies);
    let labels: BTreeMap<String, String> = [("app".to_string(), "app-3".to_string())].into();
    let identity = Identity::new("cluster.local", "ns-8", "sa-7").unwrap();
    let connection = Connection {
        identity: Some(&identity),
        source_ip: ip(42),
        destination_port: 8080,
    };
    c.bench_function("policy evaluation (1,000 policies)", |b| {
        b.iter(|| black_box(set.evaluate(black_box("ns-7"), &labels, &connection)))
    });
}

/// TCP → HTTP/2 stream → TCP through two bridges: the copy loop and HTTP/2
/// framing without TLS; the app sockets are loopback TCP, the HTTP/2
/// connection an in-memory pipe.
fn copy_loop(c: &mut Criterion) {
    const SIZE: usize = 16 * 1024 * 1024;
    let config = kanava_ztunnel::Config::parse_from([
        "ztunnel",
        "--node-name=bench",
        "--control-plane-address=127.0.0.1:1",
        "--ca-root-file=/dev/null",
        "--node-token-file=/dev/null",
    ]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let payload = Bytes::from(vec![0x42u8; SIZE]);
    let mut group = c.benchmark_group("copy loop");
    group.throughput(Throughput::Bytes(SIZE as u64));
    group.sample_size(20);
    group.bench_function("16 MiB through client and server bridges", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let (client_io, server_io) = tokio::io::duplex(1024 * 1024);
                let server = tokio::spawn({
                    let config = config.clone();
                    async move {
                        let mut connection = hbone::server_builder(&config)
                            .handshake::<_, Bytes>(server_io)
                            .await
                            .unwrap();
                        let (request, mut respond) = connection.accept().await.unwrap().unwrap();
                        tokio::spawn(async move { while connection.accept().await.is_some() {} });
                        let send = respond
                            .send_response(http::Response::new(()), false)
                            .unwrap();
                        // The "app": reads everything, answers nothing.
                        let (app, mut app_peer) = tcp_pair().await;
                        let (read, write) = app.into_split();
                        let reader = tokio::spawn(async move {
                            let mut sink = vec![0u8; 256 * 1024];
                            let mut total = 0;
                            loop {
                                let n = app_peer.read(&mut sink).await.unwrap();
                                if n == 0 {
                                    break;
                                }
                                total += n;
                            }
                            app_peer.shutdown().await.unwrap();
                            total
                        });
                        let (_, result) = hbone::bridge(
                            read,
                            write,
                            send,
                            std::future::ready(Ok(hbone::Accepted {
                                recv: request.into_body(),
                                token: None,
                            })),
                            None,
                        )
                        .await;
                        result.unwrap();
                        reader.await.unwrap()
                    }
                });
                let (sender, connection) = hbone::client_builder(&config)
                    .handshake::<_, Bytes>(client_io)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                let mut sender = sender.ready().await.unwrap();
                let request = http::Request::builder()
                    .method("CONNECT")
                    .uri("10.0.0.1:80")
                    .body(())
                    .unwrap();
                let (response, send) = sender.send_request(request, false).unwrap();
                let response = response.await.unwrap();
                let (client, mut client_peer) = tcp_pair().await;
                let (read, write) = client.into_split();
                let writer = tokio::spawn({
                    let payload = payload.clone();
                    async move {
                        client_peer.write_all(&payload).await.unwrap();
                        client_peer.shutdown().await.unwrap();
                        let mut rest = Vec::new();
                        client_peer.read_to_end(&mut rest).await.unwrap();
                    }
                });
                let (_, result) = hbone::bridge(
                    read,
                    write,
                    send,
                    std::future::ready(Ok(hbone::Accepted {
                        recv: response.into_body(),
                        token: None,
                    })),
                    None,
                )
                .await;
                result.unwrap();
                writer.await.unwrap();
                assert_eq!(server.await.unwrap(), SIZE);
            })
        })
    });
    group.finish();
}

/// Two ends of a loopback TCP connection: the bridge reads from real
/// sockets, as in the ztunnel.
async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (connected, accepted) =
        tokio::join!(tokio::net::TcpStream::connect(address), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

/// Both sides of an HBONE handshake (TLS 1.3, X25519MLKEM768, ECDSA P-256
/// certificates both ways, SPIFFE checks), bytes passed in memory: the CPU
/// a first connection costs, without the network's round trips.
fn tls_handshake(c: &mut Criterion) {
    use kanava_tls::rustls::{ClientConnection, ServerConnection};

    kanava_tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = kanava_control_plane::ca::files::load_or_create(dir.path(), "cluster.local").unwrap();
    let roots = kanava_tls::MeshRoots::from_pem(ca.root_pem().as_bytes()).unwrap();
    let workload_cert = |service_account: &str| {
        let identity = Identity::new("cluster.local", "bench", service_account).unwrap();
        let request = kanava_tls::CertificateRequest::generate(&identity).unwrap();
        let issued = ca
            .sign_workload(
                request.csr_der(),
                &identity,
                std::time::Duration::from_secs(3600),
            )
            .unwrap();
        request.into_cert(&issued.chain_pem).unwrap()
    };
    let (client_cert, server_cert) = (workload_cert("client"), workload_cert("server"));
    let server_config = kanava_tls::hbone_server_config(
        Arc::new(kanava_tls::SingleCert(server_cert.certified_key())),
        &kanava_tls::TrustBundle::new(roots.clone()).unwrap(),
    )
    .unwrap();
    let handshake = |client_config: Arc<kanava_tls::rustls::ClientConfig>| {
        let name = kanava_tls::pki_types::ServerName::IpAddress(Ipv4Addr::new(10, 0, 0, 2).into());
        let mut client = ClientConnection::new(client_config, name).unwrap();
        let mut server = ServerConnection::new(server_config.clone()).unwrap();
        let mut wire = Vec::with_capacity(16 * 1024);
        while client.is_handshaking() || server.is_handshaking() {
            wire.clear();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire).unwrap();
            }
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
    };
    let expected = server_cert.identity().clone();
    let client_config = kanava_tls::hbone_client_config(&client_cert, &roots, &expected).unwrap();
    c.bench_function("HBONE mTLS handshake, both sides", |b| {
        b.iter(|| handshake(client_config.clone()))
    });
    c.bench_function("HBONE client TLS configuration", |b| {
        b.iter(|| {
            kanava_tls::hbone_client_config(&client_cert, &roots, black_box(&expected)).unwrap()
        })
    });
}

criterion_group!(
    micro,
    cluster_state,
    policy_evaluation,
    copy_loop,
    tls_handshake
);
criterion_main!(micro);
