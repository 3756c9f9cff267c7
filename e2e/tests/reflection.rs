//! The control plane's gRPC API is browsable: server reflection lists and
//! describes the discovery and certificate services, for a caller with a
//! node's credential (as grpcurl or Postman would ask), and for no one else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kanava_e2e::{MESH_LAB, as_node, control_plane_channel, runtime, up};
use prost::Message;
use tokio_stream::StreamExt;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

async fn ask(
    lab: &kanava_lab::Lab,
    node: Option<&str>,
    request: MessageRequest,
) -> Result<ServerReflectionResponse, tonic::Status> {
    let mut client = ServerReflectionClient::new(control_plane_channel(lab).await);
    let requests = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let call = match node {
        Some(node) => as_node(lab, node, requests),
        None => tonic::Request::new(requests),
    };
    let mut responses = client.server_reflection_info(call).await?.into_inner();
    responses.next().await.expect("one response")
}

#[test]
fn reflection_lists_and_describes_the_api_to_nodes_only() {
    let lab = up(MESH_LAB);
    runtime().block_on(async {
        let listed = ask(
            &lab,
            Some("node-1"),
            MessageRequest::ListServices(String::new()),
        )
        .await
        .unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
            panic!("not a list: {listed:?}");
        };
        let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        for service in ["kanava.v1.Discovery", "kanava.v1.Certificates"] {
            assert!(names.contains(&service), "{service} not listed: {names:?}");
        }

        let described = ask(
            &lab,
            Some("node-1"),
            MessageRequest::FileContainingSymbol("kanava.v1.Discovery".into()),
        )
        .await
        .unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = described.message_response
        else {
            panic!("no descriptor: {described:?}");
        };
        let file =
            prost_types::FileDescriptorProto::decode(files.file_descriptor_proto[0].as_slice())
                .unwrap();
        assert_eq!(file.package(), "kanava.v1");
        let discovery = file
            .service
            .iter()
            .find(|s| s.name() == "Discovery")
            .expect("the Discovery service described");
        let stream = discovery
            .method
            .iter()
            .find(|m| m.name() == "Stream")
            .unwrap();
        assert!(stream.client_streaming() && stream.server_streaming());

        let refused = ask(&lab, None, MessageRequest::ListServices(String::new()))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    });
}
