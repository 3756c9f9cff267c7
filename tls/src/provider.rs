use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::crypto::aws_lc_rs;

/// The one crypto provider every Kanava TLS connection uses.
///
/// aws-lc-rs with only the TLS 1.3 AES-GCM suites. Key exchange keeps the
/// provider's default order, which puts the X25519MLKEM768 hybrid first and
/// falls back to X25519 — the same as Istio's ztunnel, so the two can talk.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = aws_lc_rs::default_provider();
            provider.cipher_suites = vec![
                aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ];
            Arc::new(provider)
        })
        .clone()
}

/// Makes [`provider`] the process default, for libraries that ask rustls for
/// "the" provider. Call once at start-up; later calls are harmless.
pub fn install_default_provider() {
    // Err means a provider is installed already, by an earlier call.
    let _ = provider().as_ref().clone().install_default();
}
