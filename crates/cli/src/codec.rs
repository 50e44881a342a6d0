//! `tether codec-server` and `tether keygen`: payload keys, and decoding for tools that must not hold them.

use crate::args::Global;
use crate::serve::shutdown_signal;
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use tether_sdk::codec;

pub(crate) async fn codec_server_cmd(
    _g: &Global,
    keys: PathBuf,
    listen: String,
    allow_remote: bool,
) -> Result<i32> {
    let dc = codec::DataConverter::default()
        .with_codec(std::sync::Arc::new(codec::AesGcmCodec::from_file(&keys)?));
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("could not listen on {listen}"))?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() && !allow_remote {
        bail!(
            "--listen {listen} is reachable from other machines, and the codec server \
                 decrypts for anyone who asks (plain HTTP, no authentication); listen on \
                 127.0.0.1 or ::1, or pass --allow-remote if a TLS proxy that authenticates \
                 callers stands in front of it"
        );
    }
    eprintln!(
        "tether codec server listening on {} (POST /encode, /decode); Ctrl-C to stop",
        listener.local_addr()?
    );
    crate::codec_server::serve(listener, dc, shutdown_signal()).await?;
    Ok(0)
}

pub(crate) async fn keygen_cmd(_g: &Global, id: String) -> Result<i32> {
    // Loadable as it is, and appended to an existing file (`>> keys.txt`) for rotation.
    out!("# tether payload key {id} (the first key, or the one named by active = ID, encrypts)");
    out!("{id} = {}", codec::AesGcmCodec::generate_key_hex());
    Ok(0)
}
