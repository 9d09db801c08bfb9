//! TLS for the service's ports, with rustls: the certificate and key of
//! `--tls-cert`/`--tls-key`, client certificates verified against
//! `--tls-client-ca` (mutual TLS), and all of it re-read when the files
//! change, so a rotated certificate is served without a restart.
//!
//! [`ServerTls`] holds the current configurations; [`ServerTls::reload`]
//! rebuilds them when a file's size or modification time moved. A file
//! caught half-written fails to load: the previous configuration stays and
//! the next check tries again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// The TLS files of a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain, the server's first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates: when set, clients must present a certificate
    /// they signed.
    pub client_ca: Option<PathBuf>,
}

/// TLS material that cannot be used; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a PEM file (at least one).
pub fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = |e: &dyn std::fmt::Display| TlsError(format!("{what} {}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&e))?;
    if certs.is_empty() {
        return Err(fail(&"no PEM certificate in it"));
    }
    Ok(certs)
}

/// The private key of a PEM file.
pub fn read_key(path: &Path, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError(format!("{what} {}: {e}", path.display())))
}

/// The CA certificates of a PEM file as a root store.
pub fn read_roots(path: &Path, what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path, what)? {
        roots
            .add(cert)
            .map_err(|e| TlsError(format!("{what} {}: {e}", path.display())))?;
    }
    Ok(roots)
}

impl TlsFiles {
    /// A server configuration from the files: `alpn` the protocols offered,
    /// client certificates required when `client_auth` and a CA is set.
    fn server_config(&self, alpn: &[u8], client_auth: bool) -> Result<ServerConfig, TlsError> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS: {e}")))?;
        let builder = match (&self.client_ca, client_auth) {
            (Some(ca), true) => {
                let roots = read_roots(ca, "--tls-client-ca")?;
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                    .build()
                    .map_err(|e| TlsError(format!("--tls-client-ca {}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let certs = read_certs(&self.cert, "--tls-cert")?;
        let key = read_key(&self.key, "--tls-key")?;
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            TlsError(format!(
                "--tls-cert {} with --tls-key {}: {e}",
                self.cert.display(),
                self.key.display()
            ))
        })?;
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }

    /// Size and modification time of each file: what a rotation changes.
    fn stamp(&self) -> Vec<Option<(u64, SystemTime)>> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.len(), m.modified().ok()?)))
            })
            .collect()
    }
}

/// The service's TLS configurations: gRPC (HTTP/2, client certificates when
/// asked) and the metrics port (HTTP/1.1, no client certificate).
pub struct ServerTls {
    files: TlsFiles,
    grpc: RwLock<Arc<ServerConfig>>,
    http: RwLock<Arc<ServerConfig>>,
    stamp: Mutex<Vec<Option<(u64, SystemTime)>>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("files", &self.files).finish()
    }
}

impl ServerTls {
    /// Loads the files; errors name the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let stamp = files.stamp();
        let (grpc, http) = Self::build(&files)?;
        Ok(Self {
            files,
            grpc: RwLock::new(grpc),
            http: RwLock::new(http),
            stamp: Mutex::new(stamp),
        })
    }

    fn build(files: &TlsFiles) -> Result<(Arc<ServerConfig>, Arc<ServerConfig>), TlsError> {
        Ok((
            Arc::new(files.server_config(b"h2", true)?),
            Arc::new(files.server_config(b"http/1.1", false)?),
        ))
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// What new gRPC connections are served with.
    pub fn grpc(&self) -> Arc<ServerConfig> {
        self.grpc.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// What new metrics-port connections are served with.
    pub fn http(&self) -> Arc<ServerConfig> {
        self.http.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the files if any changed since they were last read (or
    /// always, when `force`): `Ok(true)` when new configurations are in
    /// place, an error (the old ones stay) when the new files do not load.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let stamp = self.files.stamp();
        let mut seen = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if !force && *seen == stamp {
            return Ok(false);
        }
        // Tried once per change: a broken file is reported once, not every check.
        *seen = stamp;
        let (grpc, http) = Self::build(&self.files)?;
        *self.grpc.write().unwrap_or_else(|e| e.into_inner()) = grpc;
        *self.http.write().unwrap_or_else(|e| e.into_inner()) = http;
        Ok(true)
    }
}

/// The names a client certificate is known by: its DNS subject alternative
/// names, then its subject's common name.
pub fn peer_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert.valid_dns_names().map(str::to_owned).collect();
    names.extend(common_name(cert.subject()));
    names
}

/// The first common name (OID 2.5.4.3) in a DER subject: a walk through its
/// SEQUENCEs and SETs to the attribute whose type is that OID.
fn common_name(der: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];
    let mut rest = der;
    while !rest.is_empty() {
        let (tag, body, after) = tlv(rest)?;
        if tag == 0x30 && body.starts_with(CN) {
            let (_, value, _) = tlv(&body[CN.len()..])?;
            return std::str::from_utf8(value).ok().map(str::to_owned);
        }
        if matches!(tag, 0x30 | 0x31)
            && let Some(name) = common_name(body)
        {
            return Some(name);
        }
        rest = after;
    }
    None
}

/// One DER element: its tag, its contents, and what follows it.
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, &b| (l << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_certificates_are_known_by_their_dns_names_and_common_name() {
        let mut params = rcgen::CertificateParams::new(vec!["trainer.example.internal".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "team-a-trainer");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Team A");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(peer_names(cert.der()), ["trainer.example.internal", "team-a-trainer"]);
        let bare = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let cert = bare.self_signed(&key).unwrap();
        // rcgen's default subject is CN "rcgen self signed cert".
        assert_eq!(peer_names(cert.der()), ["rcgen self signed cert"]);
        assert!(peer_names(&CertificateDer::from(vec![0x30, 0x03, 1, 2])).is_empty());
    }

    #[test]
    fn files_that_do_not_load_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let e = ServerTls::load(TlsFiles {
            cert: missing.clone(),
            key: junk.clone(),
            client_ca: None,
        })
        .unwrap_err()
        .to_string();
        assert!(e.starts_with(&format!("--tls-cert {}", missing.display())), "{e}");
        let e = ServerTls::load(TlsFiles {
            cert: junk.clone(),
            key: junk.clone(),
            client_ca: None,
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
