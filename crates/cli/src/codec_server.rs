//! The codec server: HTTP `/encode` and `/decode` over a [`DataConverter`], so tools that must
//! not hold keys themselves (the CLI, a UI) can show decoded payloads. Body and reply:
//! `{"payloads": [{"metadata": {"encoding": "<base64>"}, "data": "<base64>"}]}`; an error is
//! `{"error": "..."}`.
//!
//! Web pages (the tether UI in a browser) may call it only from origins it was told to allow
//! (`--allow-origin`): it decrypts for whoever asks, so a page from anywhere else, which a
//! browser would let post to a loopback address, is refused before anything is decoded.

use axum::{
    extract::{Request, State},
    http::{header, HeaderValue, Method, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::post,
    Json, Router,
};
use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
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

/// A refusal: its status and `{"error": "..."}`.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

type Reply = Result<Json<Payloads>, Refusal>;

fn error_reply(status: StatusCode, message: String) -> Response {
    Refusal(status, message).into_response()
}

fn transform(
    body: Payloads,
    f: impl Fn(Payload) -> Result<Payload, tether_sdk::codec::CodecError>,
) -> Reply {
    let mut out = Vec::with_capacity(body.payloads.len());
    for p in body.payloads {
        let payload = p
            .to_payload()
            .map_err(|e| Refusal(StatusCode::BAD_REQUEST, e))?;
        let done =
            f(payload).map_err(|e| Refusal(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        out.push(JsonPayload::from_payload(&done));
    }
    Ok(Json(Payloads { payloads: out }))
}

/// The web origins (`scheme://host[:port]`, as a browser sends them) whose pages may call the
/// codec server. Empty: no page may, only tools that send no `Origin` (the CLI).
#[derive(Debug, Clone, Default)]
pub struct AllowedOrigins(Arc<Vec<String>>);

impl AllowedOrigins {
    /// Checks and normalises each origin (lower case, default port dropped), so that what the
    /// user types matches what the browser sends.
    pub fn parse(origins: &[String]) -> Result<Self, String> {
        let mut out = Vec::with_capacity(origins.len());
        for given in origins {
            out.push(normalise_origin(given)?);
        }
        Ok(AllowedOrigins(Arc::new(out)))
    }

    /// Whether a browser's `Origin` is one of them. Browsers send the canonical form, so it is
    /// compared exactly: nothing else may pass for an allowed origin.
    fn allows(&self, origin: &str) -> bool {
        self.0.iter().any(|allowed| allowed == origin)
    }

    /// The origins, normalised.
    pub fn names(&self) -> &[String] {
        &self.0
    }
}

fn normalise_origin(given: &str) -> Result<String, String> {
    let refuse = |why: &str| -> Result<String, String> {
        Err(format!(
            "--allow-origin {given:?}: {why}; give the address of the page as the browser \
             shows it, e.g. http://127.0.0.1:8233 for the UI of `tether dev`"
        ))
    };
    if given == "*" || given.eq_ignore_ascii_case("null") {
        return refuse(
            "a codec server decrypts for whoever calls it, so every page allowed must be named",
        );
    }
    let lower = given.trim().trim_end_matches('/').to_ascii_lowercase();
    let (scheme, rest) = match lower.split_once("://") {
        Some((s @ ("http" | "https"), rest)) => (s, rest),
        _ => return refuse("it must start with http:// or https://"),
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return refuse("an origin is scheme://host[:port], with no path");
    }
    if !rest.is_ascii() {
        return refuse("give a host name that is not ASCII in its punycode form (xn--…)");
    }
    // The port, if any: after the last colon that is not inside an IPv6 address's brackets.
    let (host, port) = match rest.rfind(':') {
        Some(at) if !rest[at..].contains(']') => (&rest[..at], Some(&rest[at + 1..])),
        _ => (rest, None),
    };
    if host.is_empty() || host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return refuse("an origin is scheme://host[:port]");
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && !p.starts_with('0') => Some(n),
            _ => return refuse("its port must be a number from 1 to 65535"),
        },
    };
    let default_port = if scheme == "http" { 80 } else { 443 };
    Ok(match port {
        Some(n) if n != default_port => format!("{scheme}://{host}:{n}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// Lets an allowed page call the codec server (CORS, and the private-network preflight a
/// browser sends when a page reaches a more private address), and refuses any other page
/// before its request reaches the codec.
async fn cors(State(allowed): State<AllowedOrigins>, request: Request, next: Next) -> Response {
    let mut origins = request.headers().get_all(header::ORIGIN).iter();
    let Some(first) = origins.next() else {
        return next.run(request).await;
    };
    // An Origin that cannot be read, or more than one, is no browser's: refused, never
    // taken for a request without one.
    let origin = match (first.to_str(), origins.next()) {
        (Ok(origin), None) => origin.to_string(),
        _ => {
            return error_reply(
                StatusCode::BAD_REQUEST,
                "the request's Origin header is not one web origin".into(),
            )
        }
    };
    if !allowed.allows(&origin) {
        let what_to_do = match normalise_origin(&origin) {
            Ok(named) => format!(
                "if that page is yours, restart the codec server with --allow-origin {named}"
            ),
            Err(_) => "a page without a web origin cannot be allowed".to_string(),
        };
        return error_reply(
            StatusCode::FORBIDDEN,
            format!(
                "pages from {origin} may not use this codec server (it decrypts for whoever \
                 calls it); {what_to_do}"
            ),
        );
    }
    let wants_private_network = request
        .headers()
        .get("access-control-request-private-network")
        .is_some();
    let mut response = if request.method() == Method::OPTIONS {
        let mut preflight = StatusCode::NO_CONTENT.into_response();
        let h = preflight.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("POST"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        if wants_private_network {
            h.insert(
                "access-control-allow-private-network",
                HeaderValue::from_static("true"),
            );
        }
        preflight
    } else {
        next.run(request).await
    };
    let h = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
    }
    h.insert(header::VARY, HeaderValue::from_static("origin"));
    response
}

/// A body that is not the JSON expected is answered in the same `{"error"}` form as the rest.
type Body = Result<Json<Payloads>, axum::extract::rejection::JsonRejection>;

fn body_of(body: Body) -> Result<Payloads, Refusal> {
    body.map(|Json(b)| b).map_err(|rejected| {
        Refusal(
            rejected.status(),
            format!(
                "{}; send {{\"payloads\": [{{\"metadata\": {{..}}, \"data\": \"<base64>\"}}]}} \
                 as application/json",
                rejected.body_text()
            ),
        )
    })
}

async fn encode(State(dc): State<DataConverter>, body: Body) -> Reply {
    transform(body_of(body)?, |p| dc.encode(p))
}

async fn decode(State(dc): State<DataConverter>, body: Body) -> Reply {
    transform(body_of(body)?, |p| dc.decode(p))
}

/// Serves `/encode` and `/decode` on `listener` until `shutdown` resolves; pages from
/// `allowed` origins may call them from a browser.
pub async fn serve(
    listener: tokio::net::TcpListener,
    dc: DataConverter,
    allowed: AllowedOrigins,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/encode", post(encode))
        .route("/decode", post(decode))
        .fallback(|| async {
            Refusal(
                StatusCode::NOT_FOUND,
                "a codec server answers POST /encode and POST /decode only".into(),
            )
        })
        .method_not_allowed_fallback(|| async {
            Refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                "/encode and /decode take POST".into(),
            )
        })
        .with_state(dc)
        .layer(axum::middleware::from_fn_with_state(allowed, cors));
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
        let why = serde_json::from_str::<serde_json::Value>(body.trim())
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| body.trim().to_string());
        return Err(format!(
            "the codec server refused: {}: {why}",
            head.lines().next().unwrap_or("")
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
        let server = tokio::spawn(serve(
            listener,
            dc.clone(),
            AllowedOrigins::default(),
            async move {
                let _ = stopped.await;
            },
        ));
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
    async fn raw_http(addr: std::net::SocketAddr, request: String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        reply
    }

    #[tokio::test]
    async fn only_pages_from_allowed_origins_may_decode_from_a_browser() {
        let dc = DataConverter::default().with_codec(Arc::new(AesGcmCodec::new("k1", [4u8; 32])));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let allowed = AllowedOrigins::parse(&["HTTP://127.0.0.1:8233/".to_string()]).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, dc.clone(), allowed, async move {
            let _ = stopped.await;
        }));

        let preflight = raw_http(
            addr,
            "OPTIONS /decode HTTP/1.1\r\nHost: x\r\nOrigin: http://127.0.0.1:8233\r\n\
             Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n\
             Access-Control-Request-Private-Network: true\r\nConnection: close\r\n\r\n"
                .to_string(),
        )
        .await
        .to_ascii_lowercase();
        assert!(preflight.starts_with("http/1.1 204"), "{preflight}");
        assert!(
            preflight.contains("access-control-allow-origin: http://127.0.0.1:8233"),
            "{preflight}"
        );
        assert!(preflight.contains("access-control-allow-methods: post"));
        assert!(preflight.contains("access-control-allow-headers: content-type"));
        assert!(preflight.contains("access-control-allow-private-network: true"));

        let sealed = dc.to_payload("the plain text").unwrap();
        let body = serde_json::to_string(&Payloads {
            payloads: vec![JsonPayload::from_payload(&sealed)],
        })
        .unwrap();
        let post_from = |origin: &str| {
            format!(
                "POST /decode HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        };
        let allowed_reply = raw_http(addr, post_from("http://127.0.0.1:8233")).await;
        assert!(allowed_reply.starts_with("HTTP/1.1 200"), "{allowed_reply}");
        assert!(allowed_reply
            .to_ascii_lowercase()
            .contains("access-control-allow-origin: http://127.0.0.1:8233"));
        let plain_b64 = B64.encode(b"\"the plain text\"");
        assert!(allowed_reply.contains(&plain_b64), "{allowed_reply}");

        // A preflight from a page not allowed is refused, without the header that would let
        // the browser go on.
        let refused_preflight = raw_http(
            addr,
            "OPTIONS /decode HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n\
             Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
                .to_string(),
        )
        .await;
        assert!(
            refused_preflight.starts_with("HTTP/1.1 403"),
            "{refused_preflight}"
        );
        assert!(
            !refused_preflight
                .to_ascii_lowercase()
                .contains("access-control-allow-origin"),
            "{refused_preflight}"
        );
        // Two Origin headers are no browser's request: refused, not read as none.
        let two = post_from("http://127.0.0.1:8233").replacen(
            "Origin: http://127.0.0.1:8233\r\n",
            "Origin: http://127.0.0.1:8233\r\nOrigin: http://evil.example\r\n",
            1,
        );
        let refused_two = raw_http(addr, two).await;
        assert!(refused_two.starts_with("HTTP/1.1 400"), "{refused_two}");
        assert!(!refused_two.contains(&plain_b64), "{refused_two}");
        // A body that is not the JSON expected gets a JSON answer that says what to send.
        let garbage = "POST /decode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                       Content-Length: 5\r\nConnection: close\r\n\r\n{nope"
            .to_string();
        let garbage = raw_http(addr, garbage).await;
        assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
        assert!(
            garbage.contains("\"error\"") && garbage.contains("payloads"),
            "{garbage}"
        );

        for stranger in ["http://evil.example", "http://127.0.0.1:9999", "null"] {
            let refused = raw_http(addr, post_from(stranger)).await;
            assert!(refused.starts_with("HTTP/1.1 403"), "{stranger}: {refused}");
            assert!(
                stranger == "null" || refused.contains(&format!("--allow-origin {stranger}")),
                "the refusal says what to do: {refused}"
            );
            assert!(
                !refused.contains(&plain_b64),
                "nothing was decoded for {stranger}"
            );
            assert!(
                !refused
                    .to_ascii_lowercase()
                    .contains("access-control-allow-origin"),
                "{refused}"
            );
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[test]
    fn origins_are_named_exactly_or_refused() {
        let parsed = AllowedOrigins::parse(&[
            "https://ui.example.com:443".into(),
            "http://localhost:80/".into(),
            "http://[::1]:8233".into(),
        ])
        .unwrap();
        assert!(parsed.allows("https://ui.example.com"));
        assert!(parsed.allows("http://localhost"));
        assert!(parsed.allows("http://[::1]:8233"));
        assert!(!parsed.allows("http://ui.example.com"));
        assert!(
            !parsed.allows("HTTPS://ui.example.com")
                && !parsed.allows("https://ui.example.com:443"),
            "a browser's Origin is compared as sent"
        );
        assert_eq!(
            parsed.names(),
            [
                "https://ui.example.com",
                "http://localhost",
                "http://[::1]:8233"
            ]
        );
        for bad in [
            "*",
            "null",
            "ftp://x",
            "http://x/ui",
            "127.0.0.1:8233",
            "http://",
            "http://x:0",
            "http://x:08233",
            "http://x:abc",
            "http://x:70000",
            "http://::1:8233",
            "http://ünï.example",
        ] {
            let err = AllowedOrigins::parse(&[bad.to_string()]).unwrap_err();
            assert!(err.contains("--allow-origin"), "{bad}: {err}");
        }
    }
}
