//! One pooled HTTP/1.1 client for a whole `fetch`: kept-alive connections, http and https.
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::header::{PROXY_AUTHORIZATION, RANGE};
use hyper::Request;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::ClientConfig;

use crate::proxy::{forward_auth, ProxyConnector};
use crate::spec::{Job, Options};

pub type HttpClient = Client<HttpsConnector<ProxyConnector>, Empty<Bytes>>;

pub fn build(options: &Options) -> HttpClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false); // the TLS layer above handles https
    http.set_nodelay(true);
    http.set_connect_timeout(Some(options.connect_timeout));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls_config().as_ref().clone())
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

/// The system trust store (SSL_CERT_FILE / SSL_CERT_DIR honoured), loaded once per process.
/// Unreadable or missing certificates only matter if an https URL is used: the handshake then fails
/// with a message that says so.
fn tls_config() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}
