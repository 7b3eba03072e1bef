//! The coordinator's accept loop, shared by the gRPC and HTTP ports: what stands between a
//! socket that anyone on the network can open and the services behind it.
//!
//! - At most [`MAX_CONNECTIONS`] connections are open at once; one more is closed at once
//!   (before it costs a task), and the count is logged.
//! - A connection must send its first bytes (the HTTP/2 preface, a TLS hello, an HTTP/1 request
//!   line) within [`FIRST_BYTES_TIMEOUT`], or it is closed: idle sockets do not pile up.
//! - An accept error (file descriptors exhausted, a reset before accept) is logged and waited
//!   out; it never ends the server, as tonic's own loop would for some of them.
//!
//! Per-connection limits (concurrent calls, streams) are set on the servers themselves.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt};

/// Connections open at once per port: a real worker holds one, so this is above the largest
/// cluster the coordinator is measured with (10,000 workers, docs/BENCHMARKS.md) plus clients.
pub const MAX_CONNECTIONS: usize = 16_384;
/// Time a new connection has to send its first bytes.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error (e.g. no file descriptors left) before accepting again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// An accepted connection: holds its slot of [`MAX_CONNECTIONS`] until dropped, and fails its
/// reads if the peer sends nothing within [`FIRST_BYTES_TIMEOUT`].
#[derive(Debug)]
pub struct Guarded {
    stream: TcpStream,
    peer: SocketAddr,
    /// Until the first bytes arrive.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let me = &mut *self;
        match Pin::new(&mut me.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    me.deadline = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = me.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired { Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "no request within the first-bytes timeout"))) } else { Poll::Pending }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        tonic::transport::server::TcpConnectInfo { local_addr: self.stream.local_addr().ok(), remote_addr: self.stream.peer_addr().ok() }
    }
}

/// Guarded connections accepted from one listener: a stream for tonic
/// ([`into_stream`](Self::into_stream)) or an axum listener.
#[derive(Debug)]
pub struct Incoming {
    rx: tokio::sync::mpsc::Receiver<Guarded>,
    local: SocketAddr,
}

impl Incoming {
    /// Starts accepting on `listener` (`port` names it in logs).
    pub fn new(listener: TcpListener, port: &'static str) -> io::Result<Incoming> {
        let local = listener.local_addr()?;
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut refused = 0u64;
            loop {
                let (stream, from) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("{port}: accept failed ({e}); retrying");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    refused += 1;
                    if refused.is_power_of_two() {
                        tracing::warn!("{port}: {MAX_CONNECTIONS} connections are open; closed one from {from} ({refused} so far)");
                    }
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let g = Guarded { stream, peer: from, deadline: Some(Box::pin(tokio::time::sleep(FIRST_BYTES_TIMEOUT))), _slot: slot };
                if tx.send(g).await.is_err() {
                    return;
                }
            }
        });
        Ok(Incoming { rx, local })
    }

    /// The connections as a stream (tonic's `serve_with_incoming`).
    pub fn into_stream(self) -> impl Stream<Item = io::Result<Guarded>> {
        tokio_stream::wrappers::ReceiverStream::new(self.rx).map(Ok)
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Guarded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Guarded, SocketAddr) {
        match self.rx.recv().await {
            Some(g) => {
                let peer = g.peer;
                (g, peer)
            }
            // The accept task ends only with the process.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_and_a_talking_one_is_not() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut incoming = Box::pin(Incoming::new(l, "test").unwrap().into_stream());
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut g = incoming.next().await.unwrap().unwrap();
        let mut buf = [0u8; 4];
        let e = g.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);

        let mut talker = TcpStream::connect(addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut talker, b"PRI ").await.unwrap();
        let mut g = incoming.next().await.unwrap().unwrap();
        assert_eq!(g.read(&mut buf).await.unwrap(), 4);
        tokio::time::advance(FIRST_BYTES_TIMEOUT * 2).await;
        tokio::io::AsyncWriteExt::write_all(&mut talker, b"more").await.unwrap();
        assert_eq!(g.read(&mut buf).await.unwrap(), 4, "after its first bytes a connection has no deadline");
    }
}
