//! One pooled HTTP/1.1 client for a whole `fetch`: kept-alive connections, http and https, and the
//! one rule of trust for https (the CAs Python resolved from AWS_CA_BUNDLE / SSL_CERT_FILE /
//! SSL_CERT_DIR, else the system store).
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{PROXY_AUTHORIZATION, RANGE};
use hyper::Request;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use crate::proxy::{forward_auth, ProxyConnector};
use crate::spec::{Job, Options};

pub type HttpClient = Client<HttpsConnector<ProxyConnector>, Empty<Bytes>>;

pub fn build(options: &Options) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false); // the TLS layer above handles https
    http.set_nodelay(true);
    http.set_connect_timeout(Some(options.connect_timeout));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(&options.trust).as_ref().clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(ProxyConnector::from_env(http));
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(options.concurrency)
        .build(connector)
}

/// `GET` of bytes `start..=end` of the job's object, with the caller's extra headers.
pub fn range_request(job: &Job, start: u64, end: u64) -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = job.uri.clone();
    let headers = request.headers_mut();
    headers.extend(job.headers.clone());
    if let Some(auth) = forward_auth(&job.uri) {
        headers.insert(PROXY_AUTHORIZATION, auth);
    }
    let range = format!("bytes={start}-{end}");
    headers.insert(
        RANGE,
        range.parse().expect("a byte range is a valid header value"),
    );
    request
}

/// The CAs an https server must chain to. A file or a folder (or both) *replace* the system store, as
/// boto3's `verify=`, urllib3's `ca_certs` and Go's SSL_CERT_FILE do: with the CA of a cluster named, a
/// certificate from a public CA is not trusted by one engine and refused by another.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trust {
    pub ca_file: Option<PathBuf>,
    pub ca_dir: Option<PathBuf>,
}

impl Trust {
    /// The root store: the named PEM file and every PEM file in the named folder; neither: the system
    /// store (rustls-native-certs: SSL_CERT_FILE / SSL_CERT_DIR, else OpenSSL's default paths). Files
    /// that cannot be read, or hold no certificate, add nothing (Python checked the named file first): the
    /// handshake then fails with `UnknownIssuer`, which says what to fix.
    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        if self.ca_file.is_none() && self.ca_dir.is_none() {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            return roots;
        }
        if let Some(file) = &self.ca_file {
            roots.add_parsable_certificates(pem_certificates(file));
        }
        if let Some(dir) = &self.ca_dir {
            let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
            for entry in entries {
                roots.add_parsable_certificates(pem_certificates(&entry.path()));
            }
        }
        roots
    }
}

/// The certificates of one PEM file (none if it cannot be read or holds other things).
fn pem_certificates(path: &Path) -> Vec<CertificateDer<'static>> {
    match CertificateDer::pem_file_iter(path) {
        Ok(items) => items.filter_map(Result::ok).collect(),
        Err(_) => Vec::new(),
    }
}

/// The TLS configuration for `trust`, built once per process for each trust (a pull uses one).
fn tls_config(trust: &Trust) -> Arc<ClientConfig> {
    type Built = Mutex<Vec<(Trust, Arc<ClientConfig>)>>;
    static CONFIGS: OnceLock<Built> = OnceLock::new();
    let configs = CONFIGS.get_or_init(|| Mutex::new(Vec::new()));
    let mut configs = configs
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, config)) = configs.iter().find(|(built, _)| built == trust) {
        return config.clone();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(trust.roots())
        .with_no_client_auth();
    let config = Arc::new(config);
    configs.push((trust.clone(), config.clone()));
    config
}

/// The server's certificate was refused (unknown issuer, another host's name, expired, ...): rustls'
/// own words, or None for any other failure. A setting to fix, never worth a retry.
pub fn untrusted(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(tls) = rustls_error(e) {
            return matches!(tls, rustls::Error::InvalidCertificate(_)).then(|| tls.to_string());
        }
        current = e.source();
    }
    None
}

/// The rustls error `err` is or carries. tokio-rustls hands the handshake's error inside an io::Error
/// (and the proxy connector wraps that in another), whose `source()` skips the error it holds.
fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = err;
    for _ in 0..8 {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let io = current.downcast_ref::<std::io::Error>()?;
        current = io.get_ref()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Error, ErrorKind};

    #[test]
    fn a_refused_certificate_is_found_inside_nested_io_errors() {
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let nested = Error::other(Error::new(ErrorKind::InvalidData, refused));
        assert_eq!(
            untrusted(&nested).as_deref(),
            Some("invalid peer certificate: UnknownIssuer")
        );
        let other_tls = Error::other(Error::new(
            ErrorKind::InvalidData,
            rustls::Error::DecryptError,
        ));
        assert_eq!(untrusted(&other_tls), None);
        assert_eq!(untrusted(&Error::other("connection reset")), None);
    }

    #[test]
    fn a_missing_ca_file_adds_no_root() {
        let trust = Trust {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ca_dir: None,
        };
        assert!(trust.roots().is_empty());
    }
}
