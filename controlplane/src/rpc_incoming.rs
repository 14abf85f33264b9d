//! The gRPC service's connections, bounded: at most `LLUMLET_RPC_MAX_CONNECTIONS` are served at
//! once (one more is closed at once, before anything is read), and a connection that has not
//! sent its first [`OPENING_BYTES`] (an HTTP/2 preface, or a TLS hello) within
//! [`FIRST_BYTE_WITHIN`] is closed, so idle or trickling sockets cannot hold the slots for ever. The Llumnix scheduler keeps one or two connections to a llumlet.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a new connection may stay silent before it is closed (a gRPC client sends its
/// HTTP/2 preface at once; TLS clients their hello).
pub const FIRST_BYTE_WITHIN: Duration = Duration::from_secs(5);

/// The bytes every client sends first: the HTTP/2 connection preface is 24 bytes (a TLS
/// client hello is longer).
pub const OPENING_BYTES: usize = 24;

/// The connections `listener` accepts, at most `max` at once: each holds a permit until it
/// closes; one beyond is dropped (closed) as it is accepted. A connection whose peer sends
/// nothing within `first_byte` fails its reads.
pub fn limited(
    listener: TcpListener,
    max: usize,
    first_byte: Duration,
) -> impl Stream<Item = io::Result<Limited>> + Send + 'static {
    let permits = Arc::new(Semaphore::new(max));
    let last_log = Arc::new(AtomicU64::new(0));
    tokio_stream::wrappers::TcpListenerStream::new(listener).filter_map(move |accepted| {
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => Some(Ok(Limited {
                stream,
                _permit: permit,
                first_byte: Some(Box::pin(tokio::time::sleep(first_byte))),
                opened: 0,
            })),
            Err(_) => {
                // At most one line a second, however fast connections come.
                let now = (crate::status::wall_ms() / 1000) as u64;
                if last_log.swap(now, Ordering::Relaxed) != now {
                    tracing::warn!(
                        max,
                        "gRPC connection refused: LLUMLET_RPC_MAX_CONNECTIONS are open"
                    );
                }
                None
            }
        }
    })
}

/// A served connection: its slot is free again when it closes.
pub struct Limited {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Until the peer's opening bytes: when they must have arrived.
    first_byte: Option<Pin<Box<Sleep>>>,
    /// Bytes read so far, up to [`OPENING_BYTES`].
    opened: usize,
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.opened += buf.filled().len() - before;
                if this.opened >= OPENING_BYTES {
                    this.first_byte = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                let late = this
                    .first_byte
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if late {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request on a new gRPC connection",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Beyond `max` open connections one more is closed at once; a slot frees when a
    /// connection closes; a connection silent past its first-byte deadline ends in an error.
    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_silent_ones_time_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(limited(listener, 2, Duration::from_millis(500)));
        let c1 = TcpStream::connect(addr).await.unwrap();
        let c2 = TcpStream::connect(addr).await.unwrap();
        let s1 = incoming.next().await.unwrap().unwrap();
        let _s2 = incoming.next().await.unwrap().unwrap();
        let mut c3 = TcpStream::connect(addr).await.unwrap();
        let served = tokio::time::timeout(Duration::from_millis(300), incoming.next()).await;
        assert!(served.is_err(), "a third connection was served");
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(2), c3.read(&mut b))
            .await
            .expect("the third connection is closed at once");
        assert!(matches!(n, Ok(0) | Err(_)));
        drop((s1, c1));
        let _c4 = TcpStream::connect(addr).await.unwrap();
        let mut s4 = tokio::time::timeout(Duration::from_secs(2), incoming.next())
            .await
            .expect("a slot freed")
            .unwrap()
            .unwrap();
        // Nothing sent on the new connection: its reads end at the deadline.
        let r = tokio::time::timeout(Duration::from_secs(5), s4.read(&mut b))
            .await
            .expect("the deadline ends the read");
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
        drop(c2);
    }
}
