//! The `--http` server over TLS (`tls_server_config` in the `--http-config` file): a
//! listener for `axum::serve` that hands over connections whose TLS handshake is done.
//! Handshakes run each in a task of its own (a slow client holds up no other), and end
//! after [`HANDSHAKE_TIMEOUT`]. A client that speaks plain HTTP to the port gets a 400
//! that says to use https, as Go's servers (Prometheus') answer; both refusals are
//! counted and logged through [`Refusals`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::access::{Reason, Refusals};

/// A handshake not done by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections handed to the server, TLS done.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Accepts on `tcp` from now on (in a task of the current runtime).
    pub fn new(
        tcp: TcpListener,
        config: Arc<rustls::ServerConfig>,
        refusals: Arc<Refusals>,
    ) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(accept_loop(tcp, TlsAcceptor::from(config), tx, refusals));
        Ok(Self { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop ended (it never does while the listener lives).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    refusals: Arc<Refusals>,
) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: wait, as axum's own loop does.
                log::debug!("--http: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if tx.is_closed() {
            return;
        }
        let (acceptor, tx, refusals) = (acceptor.clone(), tx.clone(), refusals.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(stream, &acceptor)).await {
                Ok(Ok(Some(tls))) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Ok(None)) => {}
                Ok(Err((reason, why))) => {
                    refusals.refuse(reason, || format!("a connection from {peer}: {why}"))
                }
                Err(_) => refusals.refuse(Reason::TlsHandshake, || {
                    format!(
                        "a connection from {peer}: no TLS handshake within {} s",
                        HANDSHAKE_TIMEOUT.as_secs()
                    )
                }),
            }
        });
    }
}

const PLAIN_HTTP_BODY: &str = "Client sent an HTTP request to an HTTPS server: use https://.\n";

/// The TLS stream; none when the client closed before a byte; the refusal when it spoke
/// plain HTTP or the handshake failed.
async fn handshake(
    mut stream: TcpStream,
    acceptor: &TlsAcceptor,
) -> Result<Option<TlsStream<TcpStream>>, (Reason, String)> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(0) | Err(_) => return Ok(None),
        Ok(_) => {}
    }
    // A TLS connection opens with a handshake record (content type 22).
    if first[0] != 0x16 {
        // Read the request first, so that closing does not reset the connection before
        // the client reads the answer.
        let mut buf = [0u8; 8192];
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await;
        let reply = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PLAIN_HTTP_BODY}",
            PLAIN_HTTP_BODY.len()
        );
        let _ = stream.write_all(reply.as_bytes()).await;
        let _ = stream.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await;
        return Err((
            Reason::PlainHttp,
            "plain HTTP on the TLS port (answered 400: use https://)".to_string(),
        ));
    }
    acceptor
        .accept(stream)
        .await
        .map(Some)
        .map_err(|e| (Reason::TlsHandshake, format!("TLS handshake failed: {e}")))
}
