/// Why a certificate, key or TLS configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("malformed certificate: {0}")]
    BadCertificate(String),
    #[error("certificate has no usable identity: {0}")]
    NoIdentity(String),
    #[error("malformed private key: {0}")]
    BadKey(String),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("no trusted root certificates")]
    NoRoots,
}
