//! The codec server: HTTP `/encode` and `/decode` over a [`DataConverter`], so tools that must
//! not hold keys themselves (the CLI, a UI) can show decoded payloads. Body and reply:
//! `{"payloads": [{"metadata": {"encoding": "<base64>"}, "data": "<base64>"}]}`.

use axum::{extract::State, http::StatusCode, routing::post, Json, Router};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tether_sdk::codec::DataConverter;
use tether_wire::pb::Payload;

/// A payload as JSON (base64 fields).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct JsonPayload {
    /// Metadata values, base64.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Data, base64.
    #[serde(default)]
    pub data: String,
}

/// Request and reply body.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Payloads {
    /// The payloads.
    pub payloads: Vec<JsonPayload>,
}

impl JsonPayload {
    /// From a payload.
    pub fn from_payload(p: &Payload) -> Self {
        JsonPayload {
            metadata: p
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), B64.encode(v)))
                .collect(),
            data: B64.encode(&p.data),
        }
    }

    /// To a payload.
    pub fn to_payload(&self) -> Result<Payload, String> {
        let mut metadata = BTreeMap::new();
        for (k, v) in &self.metadata {
            metadata.insert(
                k.clone(),
                B64.decode(v)
                    .map_err(|e| format!("metadata {k:?} is not base64: {e}"))?,
            );
        }
        Ok(Payload {
            metadata,
            data: B64
                .decode(&self.data)
                .map_err(|e| format!("data is not base64: {e}"))?,
        })
    }
}

type Reply = Result<Json<Payloads>, (StatusCode, String)>;

fn transform(
    body: Payloads,
    f: impl Fn(Payload) -> Result<Payload, tether_sdk::codec::CodecError>,
) -> Reply {
    let mut out = Vec::with_capacity(body.payloads.len());
    for p in body.payloads {
        let payload = p.to_payload().map_err(|e| (StatusCode::BAD_REQUEST, e))?;
        let done = f(payload).map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        out.push(JsonPayload::from_payload(&done));
    }
    Ok(Json(Payloads { payloads: out }))
}

async fn encode(State(dc): State<DataConverter>, Json(body): Json<Payloads>) -> Reply {
    transform(body, |p| dc.encode(p))
}

async fn decode(State(dc): State<DataConverter>, Json(body): Json<Payloads>) -> Reply {
    transform(body, |p| dc.decode(p))
}

/// Serves `/encode` and `/decode` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    dc: DataConverter,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/encode", post(encode))
        .route("/decode", post(decode))
        .with_state(dc);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Asks a codec server to decode payloads (a minimal HTTP/1.1 client: loopback or a trusted
/// network; put TLS in front of a codec server that others reach).
pub async fn decode_remote(url: &str, payloads: &[Payload]) -> Result<Vec<Payload>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("codec server URL {url:?} must start with http://"))?;
    let (host, base) = match rest.split_once('/') {
        Some((h, p)) => (h, format!("/{}", p.trim_end_matches('/'))),
        None => (rest, String::new()),
    };
    let body = serde_json::to_vec(&Payloads {
        payloads: payloads.iter().map(JsonPayload::from_payload).collect(),
    })
    .map_err(|e| e.to_string())?;
    let mut stream = tokio::net::TcpStream::connect(host)
        .await
        .map_err(|e| format!("could not reach the codec server at {url}: {e}"))?;
    let head = format!(
        "POST {base}/decode HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    stream.write_all(&body).await.map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "the codec server's reply is not HTTP".to_string())?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "the codec server refused: {} {}",
            head.lines().next().unwrap_or(""),
            body.trim()
        ));
    }
    let decoded: Payloads =
        serde_json::from_str(body.trim()).map_err(|e| format!("codec server reply: {e}"))?;
    decoded
        .payloads
        .iter()
        .map(JsonPayload::to_payload)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tether_sdk::codec::{AesGcmCodec, DataConverter};

    #[tokio::test]
    async fn decodes_over_http_and_refuses_unknown_keys() {
        let dc = DataConverter::default().with_codec(Arc::new(AesGcmCodec::new("k1", [4u8; 32])));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, dc.clone(), async move {
            let _ = stopped.await;
        }));
        let sealed = dc.to_payload("hello").unwrap();
        let plain = decode_remote(&url, &[sealed]).await.unwrap();
        assert_eq!(plain[0].data, b"\"hello\"");
        let stranger =
            DataConverter::default().with_codec(Arc::new(AesGcmCodec::new("k2", [8u8; 32])));
        let err = decode_remote(&url, &[stranger.to_payload("x").unwrap()])
            .await
            .unwrap_err();
        assert!(err.contains("\"k2\""), "{err}");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
