//! Kanava's wire API, generated from `kanava/v1/*.proto`.
//!
//! - [`v1::discovery_server`] / [`v1::discovery_client`]: the xDS-like stream
//!   that tells ztunnels which workloads and services exist.
//! - [`v1::certificates_server`] / [`v1::certificates_client`]: the mesh CA.
//! - [`v1::HandoffRequest`] / [`v1::HandoffReply`]: the node-local protocol
//!   that hands a pod's network namespace to the ztunnel.

/// The encoded `FileDescriptorSet` of every `.proto`, for gRPC server
/// reflection (generic clients such as grpcurl list and describe the API
/// from it).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/kanava_descriptor.bin"));

/// Version 1 of the API (`package kanava.v1`).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("kanava.v1");
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::v1;

    /// The handoff is spoken by separate programs (the CNI plugin, the lab,
    /// the ztunnel): what one encodes the other must read back whole.
    #[test]
    fn a_handoff_survives_the_wire() {
        let request = v1::HandoffRequest {
            request: Some(v1::handoff_request::Request::Add(v1::AddPod {
                pod: Some(v1::PodInfo {
                    uid: "3f1c".into(),
                    name: "web".into(),
                    namespace: "shop".into(),
                    service_account: "web".into(),
                    ips: vec!["10.244.2.3".into(), "fd00::3".into()],
                    container_id: "sandbox-3f1c".into(),
                }),
            })),
        };
        let bytes = request.encode_to_vec();
        assert_eq!(v1::HandoffRequest::decode(bytes.as_slice()), Ok(request));
        assert!(v1::HandoffRequest::decode(&b"\xff\xff\xff"[..]).is_err());
    }

    /// Service paths are part of the wire contract with every ztunnel.
    #[test]
    fn services_keep_their_names() {
        use tonic::server::NamedService;
        assert_eq!(
            <v1::discovery_server::DiscoveryServer<Unimplemented> as NamedService>::NAME,
            "kanava.v1.Discovery"
        );
        assert_eq!(
            <v1::certificates_server::CertificatesServer<Unimplemented> as NamedService>::NAME,
            "kanava.v1.Certificates"
        );
    }

    struct Unimplemented;

    #[tonic::async_trait]
    impl v1::discovery_server::Discovery for Unimplemented {
        type StreamStream = std::pin::Pin<
            Box<
                dyn tonic::codegen::tokio_stream::Stream<
                        Item = Result<v1::DiscoveryResponse, tonic::Status>,
                    > + Send,
            >,
        >;
        async fn stream(
            &self,
            _: tonic::Request<tonic::Streaming<v1::DiscoveryRequest>>,
        ) -> Result<tonic::Response<Self::StreamStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }

    #[tonic::async_trait]
    impl v1::certificates_server::Certificates for Unimplemented {
        async fn sign(
            &self,
            _: tonic::Request<v1::SignRequest>,
        ) -> Result<tonic::Response<v1::SignResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("test"))
        }
    }
}
