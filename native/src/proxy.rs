//! HTTP(S) proxies from the environment, as curl reads them: `HTTP_PROXY` / `HTTPS_PROXY` /
//! `ALL_PROXY` / `NO_PROXY`, either case (hyper-util's `Matcher`). A plain-http target goes to the
//! proxy as a forward request (the connection is marked proxied, so hyper sends the absolute-form
//! URI); an https target goes through a CONNECT tunnel, with TLS to the origin on top. Unlike Go
//! programs (s5cmd), loopback targets are proxied too unless NO_PROXY lists them, as in curl.
use std::error::Error;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::header::HeaderValue;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn Error + Send + Sync>;

/// Connects directly, to the proxy, or through a tunnel, as the environment says for each target.
#[derive(Clone)]
pub struct ProxyConnector {
    inner: HttpConnector,
    matcher: Arc<Matcher>,
}

impl ProxyConnector {
    pub fn from_env(inner: HttpConnector) -> Self {
        ProxyConnector {
            inner,
            matcher: Arc::new(Matcher::from_env()),
        }
    }
}

/// The `Proxy-Authorization` a forward-proxied (plain http) request needs, when the proxy URL
/// carries credentials. (Tunnelled requests authenticate on the CONNECT instead.)
pub fn forward_auth(target: &Uri) -> Option<HeaderValue> {
    if target.scheme_str() != Some("http") {
        return None;
    }
    Matcher::from_env()
        .intercept(target)
        .and_then(|via| via.basic_auth().cloned())
}

impl Service<Uri> for ProxyConnector {
    type Response = ProxyStream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<ProxyStream, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, target: Uri) -> Self::Future {
        let via = self.matcher.intercept(&target);
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let Some(via) = via else {
                let io = inner.call(target).await?;
                return Ok(ProxyStream { io, proxied: false });
            };
            if target.scheme_str() == Some("https") {
                let mut tunnel = Tunnel::new(via.uri().clone(), inner);
                if let Some(auth) = via.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                poll_fn(|cx| tunnel.poll_ready(cx)).await?;
                let io = tunnel.call(target).await?;
                return Ok(ProxyStream { io, proxied: false });
            }
            let io = inner.call(via.uri().clone()).await?;
            Ok(ProxyStream { io, proxied: true })
        })
    }
}

/// A TCP connection that remembers whether it leads to a forward proxy.
pub struct ProxyStream {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for ProxyStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl Read for ProxyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for ProxyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
