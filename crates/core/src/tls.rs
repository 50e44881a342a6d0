//! mTLS (rustls through tonic) for the server, clients and workers: the certificate files
//! each side loads. Development certificates are made by the CLI (`tether certs dev`).

use std::path::Path;

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not PEM of the expected kind.
    #[error("{path} is not a PEM {what}")]
    NotPem {
        /// The file.
        path: String,
        /// Certificate or private key.
        what: &'static str,
    },
    /// Certificate generation failed.
    #[error("could not generate certificates: {0}")]
    Generate(String),
}

/// Installs rustls' ring provider once (two providers in one binary make rustls panic).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let marker: &[u8] = if what == "certificate" {
        b"-----BEGIN CERTIFICATE-----"
    } else {
        b"PRIVATE KEY-----"
    };
    if !bytes.windows(marker.len()).any(|w| w == marker) {
        return Err(TlsError::NotPem {
            path: path.display().to_string(),
            what,
        });
    }
    Ok(bytes)
}

/// The server's certificate and key, and the CA client certificates must chain to (mTLS).
#[derive(Clone)]
pub struct ServerTls {
    /// Server certificate chain (PEM).
    pub cert_pem: Vec<u8>,
    /// Server private key (PEM).
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate issued by this CA (PEM).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_auth", &self.client_ca_pem.is_some())
            .finish()
    }
}

impl ServerTls {
    /// Reads the files.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        Ok(ServerTls {
            cert_pem: read_pem(cert, "certificate")?,
            key_pem: read_pem(key, "private key")?,
            client_ca_pem: client_ca.map(|p| read_pem(p, "certificate")).transpose()?,
        })
    }
}

/// What a client or worker needs to talk TLS (and mTLS) to the server.
#[derive(Clone, Default)]
pub struct ClientTls {
    /// CA that issued the server certificate (PEM).
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM), for servers that require one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Name to check the server certificate against (default: the host of the address).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("has_client_certificate", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl ClientTls {
    /// Reads the files.
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        server_name: Option<String>,
    ) -> Result<Self, TlsError> {
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read_pem(c, "certificate")?, read_pem(k, "private key")?)),
            (None, None) => None,
            (Some(c), None) => {
                return Err(TlsError::NotPem {
                    path: format!("{} (given without --tls-key)", c.display()),
                    what: "certificate with its key",
                })
            }
            (None, Some(k)) => {
                return Err(TlsError::NotPem {
                    path: format!("{} (given without --tls-cert)", k.display()),
                    what: "private key with its certificate",
                })
            }
        };
        Ok(ClientTls {
            ca_pem: ca.map(|p| read_pem(p, "certificate")).transpose()?,
            identity,
            server_name,
        })
    }
}
