//! Telling a pre-TLS status reply from TLS.
//!
//! After the preamble a server either starts TLS (first byte 0x16) or sends
//! the 8-byte status reply (first byte `J`) and closes. [`Sniff`] wraps the
//! TCP stream under the TLS client: it inspects the first byte the server
//! sends; on `J` it reads the 8 bytes and fails the read with a
//! [`StatusError`] that [`status_of`] recovers from the TLS error.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use jvpn_proto::preamble::{STATUS_LEN, StatusReply, is_status_reply};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The server answered with a status reply.
#[derive(Debug, thiserror::Error)]
#[error("pre-TLS status {0:?}")]
pub struct StatusError(pub StatusReply);

/// Extracts the status reply from an error produced through [`Sniff`].
pub fn status_of(e: &io::Error) -> Option<StatusReply> {
    e.get_ref()?.downcast_ref::<StatusError>().map(|s| s.0)
}

#[derive(Debug)]
pub struct Sniff<S> {
    inner: S,
    head: [u8; STATUS_LEN],
    head_len: usize,
    /// Bytes of `head` already handed to the reader (TLS case).
    served: usize,
    decided: Option<bool>,
}

impl<S> Sniff<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            head: [0; STATUS_LEN],
            head_len: 0,
            served: 0,
            decided: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniff<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.decided {
                Some(false) => {
                    if this.served < this.head_len {
                        let n = (this.head_len - this.served).min(buf.remaining());
                        buf.put_slice(&this.head[this.served..this.served + n]);
                        this.served += n;
                        return Poll::Ready(Ok(()));
                    }
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                Some(true) if this.head_len == STATUS_LEN => {
                    let status = StatusReply::decode(&this.head).map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("bad status reply: {e}"))
                    })?;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        StatusError(status),
                    )));
                }
                _ => {
                    let want = if this.decided.is_none() {
                        1
                    } else {
                        STATUS_LEN
                    };
                    let mut rb = ReadBuf::new(&mut this.head[this.head_len..want]);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    this.head_len += n;
                    if this.decided.is_none() {
                        this.decided = Some(is_status_reply(this.head[0]));
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniff<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
