//! Development certificates made with rcgen (`tether certs dev`): a CA, a server certificate
//! for loopback names, and client certificates named by identity.

use std::path::{Path, PathBuf};
use tether_core::tls::TlsError;

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
