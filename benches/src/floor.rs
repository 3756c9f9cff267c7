//! The physical floor of a node proxy's cost per byte on this machine.
//!
//! Whatever a proxy does in user space, every byte it carries between two
//! nodes is encrypted once (on the sending node) and decrypted once (on the
//! receiving one), and it crosses the kernel's TCP, netfilter and veth paths
//! and is copied between kernel and user space on both nodes. The first
//! part is measured here, with the record layer the mesh uses (rustls with
//! aws-lc-rs, AES-256-GCM, full 16 KiB records); the second is the kernel
//! CPU per GiB the throughput scenario reads of each side's proxies. The
//! report adds the two up ([`crate::report`]).

use std::time::Instant;

use anyhow::{Context, bail};
use kanava_tls::rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384;
use kanava_tls::rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, OutboundChunks, OutboundPlainMessage,
};
use kanava_tls::rustls::{ContentType, ProtocolVersion};

/// A full TLS record's plaintext.
const RECORD: usize = 16 * 1024;
/// Bytes sealed and opened per measurement.
const BYTES: usize = 256 * 1024 * 1024;

/// CPU seconds (of one core) to seal and then open 1 GiB in full records:
/// what encrypting at one node and decrypting at the other costs per GiB.
pub fn aead_seconds_per_gib() -> anyhow::Result<f64> {
    let suite = TLS13_AES_256_GCM_SHA384
        .tls13()
        .context("AES-256-GCM is a TLS 1.3 suite")?;
    let key = || AeadKey::from([7u8; 32]);
    let iv = || Iv::new([3u8; 12]);
    let mut sealer = suite.aead_alg.encrypter(key(), iv());
    let mut opener = suite.aead_alg.decrypter(key(), iv());
    let plaintext = vec![0x5au8; RECORD];
    let records = BYTES / RECORD;
    let started = Instant::now();
    for seq in 0..records as u64 {
        let mut sealed = sealer
            .encrypt(
                OutboundPlainMessage {
                    typ: ContentType::ApplicationData,
                    version: ProtocolVersion::TLSv1_2,
                    payload: OutboundChunks::Single(&plaintext),
                },
                seq,
            )
            .context("seal a record")?;
        let opened = opener
            .decrypt(
                InboundOpaqueMessage::new(
                    ContentType::ApplicationData,
                    ProtocolVersion::TLSv1_2,
                    sealed.payload.as_mut(),
                ),
                seq,
            )
            .context("open a record")?;
        if opened.payload.len() != RECORD {
            bail!("a record opened to {} bytes", opened.payload.len());
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(seconds * (1u64 << 30) as f64 / BYTES as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_and_opening_costs_something_and_round_trips() {
        let seconds = aead_seconds_per_gib().expect("sealed and opened");
        // Anything from a few ms (hardware AES) to tens of s (debug build).
        assert!(seconds > 0.0 && seconds.is_finite(), "{seconds}");
    }
}
