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
    allow_origins: &[String],
) -> Result<i32> {
    let allowed =
        crate::codec_server::AllowedOrigins::parse(allow_origins).map_err(anyhow::Error::msg)?;
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
    let pages = if allow_origins.is_empty() {
        "no web page may call it (for the web UI, add --allow-origin with the UI's address, \
         e.g. --allow-origin http://127.0.0.1:8233)"
            .to_string()
    } else {
        format!("pages from {} may call it", allowed.names().join(", "))
    };
    // One write, whose failure is no reason to stop: a script that reads the address and
    // then closes the pipe must not bring the server down.
    let said = format!(
        "tether codec server listening on {bound} (POST /encode, /decode); Ctrl-C to stop\n\
         {pages}\n"
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), said.as_bytes());
    crate::codec_server::serve(listener, dc, allowed, shutdown_signal()).await?;
    Ok(0)
}

pub(crate) async fn keygen_cmd(_g: &Global, id: String) -> Result<i32> {
    // Loadable as it is, and appended to an existing file (`>> keys.txt`) for rotation.
    out!("# tether payload key {id} (the first key, or the one named by active = ID, encrypts)");
    out!("{id} = {}", codec::AesGcmCodec::generate_key_hex());
    Ok(0)
}
