//! mTLS (rustls through tonic) for the server, clients and workers, and development
//! certificates made with rcgen (`tether certs dev`).

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

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

    pub(crate) fn to_tonic(&self) -> ServerTlsConfig {
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(ca) = &self.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        config
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

    pub(crate) fn to_tonic(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca_pem {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        config
    }
}

/// A development certificate authority (never for production: its key sits in a plain file).
pub struct DevCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    /// The CA certificate (PEM).
    pub cert_pem: String,
    /// The CA key (PEM).
    pub key_pem: String,
}

fn gen(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

impl DevCa {
    /// A new self-signed CA.
    pub fn new(name: &str) -> Result<Self, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().map_err(gen)?;
        let cert = params.self_signed(&key).map_err(gen)?;
        let key_pem = key.serialize_pem();
        Ok(DevCa {
            issuer: rcgen::Issuer::new(params, key),
            cert_pem: cert.pem(),
            key_pem,
        })
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<String>,
        usage: rcgen::ExtendedKeyUsagePurpose,
        not_after: Option<time::OffsetDateTime>,
    ) -> Result<(String, String), TlsError> {
        let mut params = rcgen::CertificateParams::new(sans).map_err(gen)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        if let Some(t) = not_after {
            params.not_before = t - time::Duration::days(30);
            params.not_after = t;
        }
        let key = rcgen::KeyPair::generate().map_err(gen)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A server certificate for localhost, 127.0.0.1 and ::1 (and any extra names).
    pub fn server_cert(&self, extra_names: &[String]) -> Result<(String, String), TlsError> {
        let mut sans = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        sans.extend(extra_names.iter().cloned());
        self.issue(
            "tether-server",
            sans,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            None,
        )
    }

    /// A client certificate whose common name (and SAN) is `identity`; `not_after` in the past
    /// makes an expired one (for tests).
    pub fn client_cert(
        &self,
        identity: &str,
        not_after: Option<time::OffsetDateTime>,
    ) -> Result<(String, String), TlsError> {
        self.issue(
            identity,
            vec![identity.to_string()],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            not_after,
        )
    }
}

/// Writes a development CA, a server certificate for localhost and client certificates for
/// `clients` into `out`; returns the files written.
pub fn write_dev_certs(out: &Path, clients: &[&str]) -> Result<Vec<PathBuf>, TlsError> {
    std::fs::create_dir_all(out).map_err(|source| TlsError::Io {
        path: out.display().to_string(),
        source,
    })?;
    let ca = DevCa::new("tether development CA")?;
    let mut files = Vec::new();
    let mut write = |name: &str, text: &str| -> Result<(), TlsError> {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|source| TlsError::Io {
            path: path.display().to_string(),
            source,
        })?;
        files.push(path);
        Ok(())
    };
    write("ca.pem", &ca.cert_pem)?;
    write("ca.key", &ca.key_pem)?;
    let (cert, key) = ca.server_cert(&[])?;
    write("server.pem", &cert)?;
    write("server.key", &key)?;
    for c in clients {
        let (cert, key) = ca.client_cert(c, None)?;
        write(&format!("{c}.pem"), &cert)?;
        write(&format!("{c}.key"), &key)?;
    }
    Ok(files)
}
