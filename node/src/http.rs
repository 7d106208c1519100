//! HTTP serving for every role: the hub's and the relay's APIs and every
//! member's `/metrics`. The same router `axum::serve` would run, with two
//! limits it does not have: a client must send a request's headers within
//! [`HEADER_TIMEOUT`] (hyper's header read timeout, which needs a timer
//! that `axum::serve` does not give it), so a client that opens a
//! connection and then sends nothing, or a byte now and then, is closed;
//! and at most `max_connections` are served at once, past which a new
//! connection is closed at once, so slow or greedy clients cannot take
//! every file descriptor of the process (its database and its QUIC socket
//! need some). Only HTTP/1.1 is served.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Time a client has to send a request's headers, from the moment the
/// server starts waiting for them (a new connection, or the next request
/// on a kept-alive one).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Time in-flight requests get to finish once the server stops.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections an API serves at once (the hub's and the relay's).
pub const API_CONNECTIONS: usize = 512;

/// Connections a `/metrics` endpoint serves at once.
pub const METRICS_CONNECTIONS: usize = 64;

/// How often the server says it is refusing connections at its limit.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Limits of one HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl Limits {
    pub fn api() -> Self {
        Limits {
            max_connections: API_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
        }
    }

    pub fn metrics() -> Self {
        Limits {
            max_connections: METRICS_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets in-flight
/// requests finish for up to [`DRAIN_TIMEOUT`]. `what` names the server
/// in log lines.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    what: &'static str,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut last_refusal: Option<Instant> = None;
    let mut refused = 0u64;
    loop {
        let (stream, remote) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: wait for some
                    // to be freed rather than spin.
                    warn!(server = what, %error, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused += 1;
            if last_refusal.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
                warn!(
                    server = what,
                    %remote,
                    limit = limits.max_connections,
                    refused,
                    "closing new HTTP connections: as many are open as allowed"
                );
                last_refusal = Some(Instant::now());
                refused = 0;
            }
            drop(stream);
            continue;
        };
        // The router sees the client's address (`ConnectInfo`), which
        // per-client limits key on.
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(remote));
            let mut router = router.clone();
            tower_service::Service::call(&mut router, req)
        });
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(error) = result {
                debug!(server = what, %remote, %error, "HTTP connection ended");
            }
        });
    }
    // Every permit back means every connection has ended.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, permits.acquire_many(all))
        .await
        .is_err()
    {
        debug!(server = what, "stopped with requests still in flight");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(limits: Limits) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, router, limits, "test", stop.clone()));
        (addr, stop)
    }

    /// A request's whole answer, or what came before the server closed.
    async fn get(addr: std::net::SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    /// A connection that has had one request answered and stays open.
    async fn answered_and_kept(addr: std::net::SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"ok") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before answering");
            got.extend_from_slice(&buf[..n]);
        }
        s
    }

    /// Waits until the server closes `s` (reads end), at most `limit`.
    async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(limit, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn a_client_that_does_not_finish_its_headers_is_closed_and_others_are_served() {
        let limits = Limits {
            max_connections: 16,
            header_timeout: Duration::from_millis(500),
        };
        let (addr, stop) = start(limits).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        assert!(get(addr).await.ends_with("ok"), "served meanwhile");
        // A header line every 200 ms never completes the request.
        let trickle = async {
            for _ in 0..50 {
                if slow.write_all(b"x-slow: 1\r\n").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let limit = Duration::from_secs(5);
        let (silent_closed, ()) = tokio::join!(closed_within(&mut silent, limit), trickle);
        assert!(silent_closed, "a connection that sent nothing was kept");
        assert!(
            closed_within(&mut slow, limit).await,
            "a trickling client was kept"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn past_the_connection_limit_a_new_connection_is_closed_at_once() {
        let limits = Limits {
            max_connections: 2,
            header_timeout: Duration::from_secs(2),
        };
        let (addr, stop) = start(limits).await;
        // Two connections the server has certainly taken: each has been
        // answered once and is kept alive.
        let _a = answered_and_kept(addr).await;
        let _b = answered_and_kept(addr).await;
        let mut third = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut third, Duration::from_secs(1)).await);
        // Once the two idle ones time out, requests are served again.
        let mut served = false;
        for _ in 0..50 {
            if get(addr).await.ends_with("ok") {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(served, "never served after the idle connections closed");
        stop.cancel();
    }
}
