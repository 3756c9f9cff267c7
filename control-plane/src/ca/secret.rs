//! The CA kept in the cluster (`--source kubernetes`).
//!
//! - A plug-in CA: when the Secret `cacerts` (`--plugin-ca-secret`) exists in the control plane's
//!   namespace, the control plane signs with its `ca-cert.pem`/`ca-key.pem`,
//!   trusts its `root-cert.pem` and serves its `cert-chain.pem`.
//! - Otherwise the root is in the Secret `kanava-ca` (same keys), created on
//!   the first start. When two replicas start at once, both try to create
//!   it; the API server accepts one creation and answers the other `409
//!   Conflict`, and the loser reads the winner's root: there is never a
//!   second root.
//! - The trusted roots are published in the ConfigMap `kanava-root-cert`
//!   (`root-cert.pem`), for ztunnels and for users.
//! - Both are owned (`ownerReferences`) by the control plane's Service when
//!   it exists: `helm uninstall` deletes the Service and the garbage
//!   collector the rest. An upgrade keeps the Service, and so the root. The
//!   plug-in CA's Secret is the operator's and is never touched.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kanava_mesh::names;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use super::{CertificateAuthority, SigningMaterial, generate_root};
use crate::Error;

/// Field manager of what the control plane writes.
pub const FIELD_MANAGER: &str = "kanava-control-plane";

/// The CA of the cluster: the plug-in CA if there is one, else the root in
/// its Secret, created if missing. Publishes the trusted roots.
pub async fn load_or_create(
    client: &Client,
    namespace: &str,
    plugin_ca_secret: &str,
    trust_domain: &str,
) -> Result<CertificateAuthority, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let owner = owner(client, namespace).await;
    let api = |action: &str, source| Error::Kubernetes {
        action: format!("{action} in namespace {namespace}"),
        source,
    };
    let (material, origin) = match secrets
        .get_opt(plugin_ca_secret)
        .await
        .map_err(|e| api(&format!("read Secret {plugin_ca_secret}"), e))?
    {
        Some(plug_in) => {
            let origin = format!("plug-in CA (Secret {namespace}/{plugin_ca_secret})");
            (material_of(&plug_in, &origin)?, origin)
        }
        None => {
            let origin = format!("Secret {namespace}/{}", names::CA_SECRET);
            let material = match secrets
                .get_opt(names::CA_SECRET)
                .await
                .map_err(|e| api("read Secret kanava-ca", e))?
            {
                Some(existing) => material_of(&existing, &origin)?,
                None => {
                    create_root(&secrets, namespace, trust_domain, &origin, owner.clone()).await?
                }
            };
            (material, origin)
        }
    };
    let ca = CertificateAuthority::from_material(&material, trust_domain, &origin)?;
    publish_roots(client, namespace, &ca.root_pem(), owner).await?;
    Ok(ca)
}

/// The material in force in the cluster now: the plug-in CA's Secret if it
/// exists, else `kanava-ca` (never created here: [`load_or_create`] did at
/// start).
pub(super) async fn read_material(
    client: &Client,
    namespace: &str,
    plugin_ca_secret: &str,
) -> Result<(SigningMaterial, String), Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for name in [plugin_ca_secret, names::CA_SECRET] {
        let secret = secrets
            .get_opt(name)
            .await
            .map_err(|source| Error::Kubernetes {
                action: format!("read Secret {name} in namespace {namespace}"),
                source,
            })?;
        if let Some(secret) = secret {
            let origin = if name == plugin_ca_secret {
                format!("plug-in CA (Secret {namespace}/{name})")
            } else {
                format!("Secret {namespace}/{name}")
            };
            return Ok((material_of(&secret, &origin)?, origin));
        }
    }
    Err(Error::CaUnusable {
        origin: format!("namespace {namespace}"),
        reason: format!(
            "neither Secret {plugin_ca_secret} nor {} exists",
            names::CA_SECRET
        ),
    })
}

/// Publishes `roots_pem` in the roots ConfigMap (after a change of the CA).
pub(super) async fn publish_trusted_roots(
    client: &Client,
    namespace: &str,
    roots_pem: &str,
) -> Result<(), Error> {
    let owner = owner(client, namespace).await;
    publish_roots(client, namespace, roots_pem, owner).await
}

/// The Service that owns what the control plane creates, if it exists (a
/// control plane run outside the chart owns nothing).
async fn owner(client: &Client, namespace: &str) -> Option<OwnerReference> {
    let services: Api<Service> = Api::namespaced(client.clone(), namespace);
    match services.get_opt(names::CONTROL_PLANE_SERVICE).await {
        Ok(Some(service)) => Some(OwnerReference {
            api_version: "v1".into(),
            kind: "Service".into(),
            name: names::CONTROL_PLANE_SERVICE.into(),
            uid: service.metadata.uid?,
            ..OwnerReference::default()
        }),
        Ok(None) => None,
        Err(error) => {
            tracing::warn!(%error, "cannot read the control plane's Service; what it creates will outlive an uninstall");
            None
        }
    }
}

/// Creates the root Secret; if another replica created it first, uses
/// theirs.
async fn create_root(
    secrets: &Api<Secret>,
    namespace: &str,
    trust_domain: &str,
    origin: &str,
    owner: Option<OwnerReference>,
) -> Result<SigningMaterial, Error> {
    let material = generate_root(trust_domain)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(names::CA_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                FIELD_MANAGER.to_string(),
            )])),
            owner_references: owner.map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data_of(&material)),
        ..Secret::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(%origin, "created the mesh root");
            Ok(material)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            tracing::info!(%origin, "another replica created the mesh root first; using it");
            let winner =
                secrets
                    .get(names::CA_SECRET)
                    .await
                    .map_err(|source| Error::Kubernetes {
                        action: format!("read Secret {} after a conflict", names::CA_SECRET),
                        source,
                    })?;
            material_of(&winner, origin)
        }
        Err(source) => Err(Error::Kubernetes {
            action: format!("create Secret {namespace}/{}", names::CA_SECRET),
            source,
        }),
    }
}

/// Puts the trusted roots in their ConfigMap (server-side apply: creates it
/// or updates it, whoever wrote it before).
async fn publish_roots(
    client: &Client,
    namespace: &str,
    roots_pem: &str,
    owner: Option<OwnerReference>,
) -> Result<(), Error> {
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let mut configmap = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": names::ROOT_CERT_CONFIGMAP, "namespace": namespace},
        "data": {names::ROOT_CERT_KEY: roots_pem},
    });
    if let Some(owner) = owner {
        configmap["metadata"]["ownerReferences"] = serde_json::json!([owner]);
    }
    configmaps
        .patch(
            names::ROOT_CERT_CONFIGMAP,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&configmap),
        )
        .await
        .map_err(|source| Error::Kubernetes {
            action: format!(
                "publish the trusted roots in ConfigMap {namespace}/{}",
                names::ROOT_CERT_CONFIGMAP
            ),
            source,
        })?;
    Ok(())
}

/// The material in a CA Secret.
pub fn material_of(secret: &Secret, origin: &str) -> Result<SigningMaterial, Error> {
    let data = secret.data.as_ref();
    let text = |key: &str| -> Result<Option<String>, Error> {
        match data.and_then(|data| data.get(key)) {
            None => Ok(None),
            Some(ByteString(bytes)) => {
                String::from_utf8(bytes.clone())
                    .map(Some)
                    .map_err(|_| Error::CaUnusable {
                        origin: origin.to_string(),
                        reason: format!("{key} is not PEM text"),
                    })
            }
        }
    };
    let required = |key: &str| -> Result<String, Error> {
        text(key)?.ok_or_else(|| Error::CaUnusable {
            origin: origin.to_string(),
            reason: format!(
                "key {key} is missing (a CA Secret holds {}, {}, {} and optionally {})",
                names::CA_CERT_KEY,
                names::CA_KEY_KEY,
                names::ROOT_CERT_KEY,
                names::CERT_CHAIN_KEY
            ),
        })
    };
    Ok(SigningMaterial {
        ca_cert_pem: required(names::CA_CERT_KEY)?,
        ca_key_pem: required(names::CA_KEY_KEY)?,
        roots_pem: required(names::ROOT_CERT_KEY)?,
        chain_pem: text(names::CERT_CHAIN_KEY)?,
    })
}

fn data_of(material: &SigningMaterial) -> BTreeMap<String, ByteString> {
    let mut data = BTreeMap::from([
        (
            names::CA_CERT_KEY.to_string(),
            ByteString(material.ca_cert_pem.clone().into_bytes()),
        ),
        (
            names::CA_KEY_KEY.to_string(),
            ByteString(material.ca_key_pem.clone().into_bytes()),
        ),
        (
            names::ROOT_CERT_KEY.to_string(),
            ByteString(material.roots_pem.clone().into_bytes()),
        ),
    ]);
    if let Some(chain) = &material.chain_pem {
        data.insert(
            names::CERT_CHAIN_KEY.to_string(),
            ByteString(chain.clone().into_bytes()),
        );
    }
    data
}
