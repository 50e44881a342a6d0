//! Connecting to the server a command names, and decoding payloads for display (locally or through a codec server).

use crate::args::Global;
use anyhow::Result;
use tether_sdk::client::{Client, ClientOptions};
use tether_sdk::codec;
use tether_wire::pb;

pub(crate) async fn connect(g: &Global) -> Result<Client> {
    let tls = if g.tls_ca.is_some() || g.tls_cert.is_some() || g.tls_key.is_some() {
        Some(tether_core::tls::ClientTls::from_files(
            g.tls_ca.as_deref(),
            g.tls_cert.as_deref(),
            g.tls_key.as_deref(),
            g.tls_server_name.clone(),
        )?)
    } else {
        None
    };
    Ok(Client::connect_with(
        g.server_address(),
        ClientOptions {
            namespace: g.namespace.clone(),
            tls,
            retry_for: g.retry_for,
            ..Default::default()
        },
    )
    .await?)
}

/// Decodes payloads for display with --keys (locally) or --codec-server; without either,
/// encrypted payloads are shown as such (with their key id).
pub(crate) async fn decode_for_display(g: &Global, payloads: Vec<&mut pb::Payload>) -> Result<()> {
    if payloads.is_empty() {
        return Ok(());
    }
    if let Some(path) = &g.keys {
        let dc = codec::DataConverter::default()
            .with_codec(std::sync::Arc::new(codec::AesGcmCodec::from_file(path)?));
        for p in payloads {
            *p = dc.decode(p.clone())?;
        }
    } else if let Some(url) = &g.codec_server {
        let owned: Vec<pb::Payload> = payloads.iter().map(|p| (**p).clone()).collect();
        let decoded = crate::codec_server::decode_remote(url, &owned)
            .await
            .map_err(anyhow::Error::msg)?;
        for (slot, p) in payloads.into_iter().zip(decoded) {
            *slot = p;
        }
    }
    Ok(())
}
