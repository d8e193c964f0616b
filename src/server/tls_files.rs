//! A door's TLS settings from its PEM files: read at startup (a bad file stops it) and again on
//! SIGHUP, so a certificate renewed under a running pod (cert-manager rewriting a Secret) reaches
//! new connections without a restart. A reload that fails keeps the settings in force.
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use parking_lot::RwLock;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

/// A file given by a flag, named by its flag in every message about it.
#[derive(Debug, Clone)]
pub struct FlagPath {
    pub flag: &'static str,
    pub path: PathBuf,
}

impl FlagPath {
    /// The path behind `flag`, which TLS on makes required.
    fn required(door: &str, flag: &'static str, path: &Option<PathBuf>) -> anyhow::Result<Self> {
        let path = path
            .clone()
            .with_context(|| format!("{door} TLS is on but {flag} is not set"))?;
        Ok(Self { flag, path })
    }
}

/// Where a door's certificate chain, key and (for mutual TLS) client CAs are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// "gRPC" or "HTTP", for messages.
    pub door: &'static str,
    pub cert: FlagPath,
    pub key: FlagPath,
    /// Set for mutual TLS: client certificates must chain to these CAs.
    pub client_ca: Option<FlagPath>,
    /// ALPN protocols offered, most preferred first.
    pub alpn: Vec<Vec<u8>>,
}

/// A door's TLS flags as given: each path with the name of its flag.
pub struct TlsFlags<'a> {
    pub door: &'static str,
    /// `--*-use-ssl`.
    pub on: bool,
    /// `--*-use-ssl-mutual` (implies `on`).
    pub mutual: bool,
    pub cert: (&'static str, &'a Option<PathBuf>),
    pub key: (&'static str, &'a Option<PathBuf>),
    /// Required with `mutual`.
    pub root: (&'static str, &'a Option<PathBuf>),
    pub alpn: &'a [&'a [u8]],
}

impl TlsFiles {
    /// The files the flags name; None with TLS off, an error naming the flag that TLS on needs.
    fn from_flags(flags: TlsFlags<'_>) -> anyhow::Result<Option<Self>> {
        if !flags.on && !flags.mutual {
            return Ok(None);
        }
        let required = |(flag, path): (&'static str, &Option<PathBuf>)| {
            FlagPath::required(flags.door, flag, path)
        };
        Ok(Some(Self {
            door: flags.door,
            cert: required(flags.cert)?,
            key: required(flags.key)?,
            client_ca: flags.mutual.then(|| required(flags.root)).transpose()?,
            alpn: flags.alpn.iter().map(|p| p.to_vec()).collect(),
        }))
    }

    /// Reads the files into a rustls configuration (ring), TLS 1.2 and 1.3.
    fn server_config(&self) -> anyhow::Result<rustls::ServerConfig> {
        let certs = read_certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key.path).with_context(|| {
            format!(
                "cannot read a PEM private key from {} {}",
                self.key.flag,
                self.key.path.display()
            )
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &self.client_ca {
            Some(ca) => builder.with_client_cert_verifier(client_verifier(ca, provider)?),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).with_context(|| {
            format!(
                "invalid {} TLS certificate or key ({} does not match {})",
                self.door, self.key.flag, self.cert.flag
            )
        })?;
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }
}

/// Client certificates must chain to the CAs in `ca`.
fn client_verifier(
    ca: &FlagPath,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots
            .add(cert)
            .with_context(|| format!("invalid {} certificate", ca.flag))?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .with_context(|| format!("invalid {}", ca.flag))
}

fn read_certs(file: &FlagPath) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let FlagPath { flag, path } = file;
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {flag} {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{flag} {} is not valid PEM", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{flag} {} holds no certificate",
        path.display()
    );
    Ok(certs)
}

/// A door's TLS settings, replaced as a whole by a successful reload. A handshake under way keeps
/// the settings it began with; connections already open keep their session.
#[derive(Debug)]
pub struct ReloadingTls {
    files: TlsFiles,
    config: RwLock<Arc<rustls::ServerConfig>>,
}

impl ReloadingTls {
    /// A door's TLS from its flags, the files read now; None with TLS off. An error names the
    /// flag that is missing or whose file is at fault.
    pub fn from_flags(flags: TlsFlags<'_>) -> anyhow::Result<Option<Arc<Self>>> {
        TlsFiles::from_flags(flags)?
            .map(|files| Self::load(files).map(Arc::new))
            .transpose()
    }

    /// Reads the files; an error names the flag of the file at fault.
    fn load(files: TlsFiles) -> anyhow::Result<Self> {
        let config = files.server_config()?;
        Ok(Self {
            files,
            config: RwLock::new(Arc::new(config)),
        })
    }

    /// An acceptor with the settings in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.config.read()))
    }

    /// Reads the files again. On success new connections get the new settings; on failure
    /// nothing changes.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = self.files.server_config()?;
        *self.config.write() = Arc::new(config);
        Ok(())
    }

    /// The files a reload reads.
    pub fn files(&self) -> impl Iterator<Item = &std::path::Path> {
        let files = &self.files;
        [&files.cert, &files.key]
            .into_iter()
            .chain(&files.client_ca)
            .map(|file| file.path.as_path())
    }

    /// [`Self::reload`], its outcome logged: a renewal that fails must be seen before the
    /// certificate in force expires.
    pub fn reload_logged(&self) {
        let door = self.files.door;
        match self.reload() {
            Ok(()) => tracing::info!(
                door,
                cert = %self.files.cert.path.display(),
                "TLS certificate and key reloaded"
            ),
            Err(error) => tracing::error!(
                door,
                error = format!("{error:#}"),
                "TLS reload failed; the certificate in force is kept"
            ),
        }
    }
}

#[cfg(test)]
#[path = "tls_files_tests.rs"]
mod tests;
