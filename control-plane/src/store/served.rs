//! One resource as the store serves it.
//!
//! A resource is made once, from the mesh item the translator shares, and
//! kept encoded: every response that carries it copies these bytes, and
//! nothing a stream does needs it decoded. Decoded, a workload was a
//! `pb::Resource` of a dozen strings and a label map, about four times
//! its encoded size; at 100,000 pods that was a fifth of the control
//! plane's memory. What the store must still read of it (addresses, node,
//! identity, endpoints) it reads from the item, which the translator holds
//! anyway.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use kanava_mesh::policy::Policy;
use kanava_mesh::{Identity, Service, Workload};
use kanava_proto::v1 as pb;
use prost::Message;

/// What a resource was made from.
#[derive(Clone, Debug)]
pub enum Item {
    Workload(Arc<Workload>),
    Service(Arc<Service>),
    Policy(Arc<Policy>),
}

impl Item {
    /// The address of the shared item: the same `Arc` again means the same
    /// item, unchanged.
    pub fn address(&self) -> usize {
        match self {
            Item::Workload(item) => Arc::as_ptr(item) as usize,
            Item::Service(item) => Arc::as_ptr(item) as usize,
            Item::Policy(item) => Arc::as_ptr(item) as usize,
        }
    }
}

/// A resource served to ztunnels: its name, the item it was made from, and
/// the `pb::Resource` encoded.
#[derive(Debug)]
pub struct Served {
    /// Shared by every map of the store that names it.
    name: Arc<str>,
    item: Item,
    encoded: Bytes,
}

impl Served {
    /// Makes the resource of `item`.
    pub fn new(item: Item) -> Self {
        let (name, kind) = match &item {
            Item::Workload(workload) => (
                workload.resource_name(),
                pb::resource::Kind::Workload(workload.to_proto()),
            ),
            Item::Service(service) => (
                service.resource_name(),
                pb::resource::Kind::Service(service.to_proto()),
            ),
            Item::Policy(policy) => (
                policy.resource_name(),
                pb::resource::Kind::Policy(policy.to_proto()),
            ),
        };
        let resource = pb::Resource {
            name,
            kind: Some(kind),
        };
        let encoded = Bytes::from(resource.encode_to_vec());
        Served {
            name: resource.name.into(),
            item,
            encoded,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name, shared.
    pub fn shared_name(&self) -> &Arc<str> {
        &self.name
    }

    pub fn item(&self) -> &Item {
        &self.item
    }

    /// The `pb::Resource` as protobuf.
    pub fn encoded(&self) -> &Bytes {
        &self.encoded
    }

    /// The `pb::Resource` itself (for tests and diagnostics: responses
    /// carry [`encoded`](Self::encoded)).
    pub fn decode(&self) -> Result<pb::Resource, prost::DecodeError> {
        pb::Resource::decode(self.encoded.clone())
    }

    /// Whether serving `new` in place of this changes nothing a ztunnel
    /// does. A pod's `resourceVersion` changes with every status update of
    /// the kubelet, which changes nothing else: such an update is no
    /// change. (Services and policies change when their objects do, and
    /// those are written by people.)
    pub fn same_for_ztunnels(&self, new: &Served) -> bool {
        match (&self.item, &new.item) {
            (Item::Workload(served), Item::Workload(new)) => same_but_version(served, new),
            _ => self == new,
        }
    }

    /// Where an enrolled workload runs, and as whom: what makes its
    /// identity requestable there. `None` for anything else (a pod outside
    /// the mesh has no use for a certificate).
    pub fn runs_as(&self) -> Option<(&str, &Identity)> {
        match &self.item {
            Item::Workload(workload) if workload.in_mesh() => {
                Some((&workload.node, &workload.identity))
            }
            _ => None,
        }
    }

    /// The addresses it holds: a workload's IPs, a Service's virtual IPs.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let ips: &[IpAddr] = match &self.item {
            Item::Workload(workload) => &workload.ips,
            Item::Service(service) => &service.addresses,
            Item::Policy(_) => &[],
        };
        ips.iter().map(|ip| ip.to_canonical())
    }
}

/// Whether two workloads are equal but for their `resource_version`,
/// without copying either (every status update of a pod asks). Every
/// field is named, so a field added to `Workload` must be decided here.
fn same_but_version(a: &Workload, b: &Workload) -> bool {
    let Workload {
        uid,
        name,
        namespace,
        service_account,
        node,
        ips,
        identity,
        protocol,
        labels,
        mtls_mode,
        resource_version: _,
        plaintext_inbound_ports,
    } = a;
    *uid == b.uid
        && *name == b.name
        && *namespace == b.namespace
        && *service_account == b.service_account
        && *node == b.node
        && *ips == b.ips
        && *identity == b.identity
        && *protocol == b.protocol
        && *labels == b.labels
        && *mtls_mode == b.mtls_mode
        && *plaintext_inbound_ports == b.plaintext_inbound_ports
}

/// Two resources are equal when ztunnels are sent the same bytes.
impl PartialEq for Served {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.encoded == other.encoded
    }
}
