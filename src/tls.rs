//! TLS for vmlet's own links, shared by the agent and the API component: PEM files in,
//! rustls configurations out (ring as the provider, as kube uses).
//!
//! - The API component serves the Kubernetes API server's aggregator: its client
//!   certificate is checked against the request-header CA the cluster publishes.
//! - The API component opens guest streams on agents over mutual TLS under the console
//!   CA the chart makes: the agent checks the component's client certificate, the
//!   component checks the agent's server certificate, issued for [`AGENT_SERVER_NAME`]
//!   (agents are reached by IP, so one fixed name stands for all of them).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The name in every agent's stream certificate.
pub const AGENT_SERVER_NAME: &str = "vmlet-agent";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {error}")]
    Pem { path: String, error: String },
    #[error("{0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        error: e.to_string(),
    }
}

/// Every certificate in a PEM file.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no certificate"));
    }
    Ok(certs)
}

/// Every certificate in PEM text.
pub fn certs_in(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Config(format!("PEM certificates: {e}")))
}

/// The private key in a PEM file.
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e))
}

/// Trust anchors from certificates.
pub fn roots(cas: Vec<CertificateDer<'static>>) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// A server that serves `cert`/`key` and asks for a client certificate issued by
/// `client_cas`: required, or (`optional`) checked when one is given, for probes.
pub fn server(
    cert: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_cas: Arc<RootCertStore>,
    optional: bool,
) -> Result<ServerConfig, TlsError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(client_cas, provider());
    let verifier = if optional {
        verifier.allow_unauthenticated()
    } else {
        verifier
    }
    .build()
    .map_err(|e| TlsError::Config(e.to_string()))?;
    ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert, key)
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// A client that presents `cert`/`key` and trusts servers issued by `cas`.
pub fn client(
    cas: Arc<RootCertStore>,
    cert: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig, TlsError> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(cas)
        .with_client_auth_cert(cert, key)
        .map_err(|e| TlsError::Config(e.to_string()))
}

/// The name agents' certificates are checked against.
pub fn agent_server_name() -> ServerName<'static> {
    ServerName::try_from(AGENT_SERVER_NAME).expect("a valid DNS name")
}

/// The subject's common name of a DER certificate, if it has one.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// A directory holding `ca.crt`, `tls.crt` and `tls.key` (a Kubernetes TLS Secret with
/// the CA beside it).
pub struct Bundle {
    pub ca: Arc<RootCertStore>,
    pub cert: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Bundle {
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        Ok(Bundle {
            ca: roots(certs(&dir.join("ca.crt"))?)?,
            cert: certs(&dir.join("tls.crt"))?,
            key: key(&dir.join("tls.key"))?,
        })
    }
}
