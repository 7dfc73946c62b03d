//! One HTTP/2 `CONNECT` stream as a byte stream (RFC 9113 §8.5), at either
//! end of the data plane.
//!
//! Written on `h2` directly rather than on hyper's upgrade, for one reason:
//! a stream that fails must end with `RST_STREAM(CONNECT_ERROR)`, and the
//! other end must see that as a reset. hyper's upgraded stream can only end
//! with `END_STREAM` (a clean end), and it reads a `CANCEL` reset as EOF, so
//! a destination's reset reached the application as a complete download.
//! Here any reset, and any error of the connection under the stream, reads
//! and writes as `ConnectionReset`; dropping a stream that did not end
//! cleanly both ways resets it.
//!
//! Writes take HTTP/2 send capacity before they copy: the bytes a stream
//! holds on their way to the channel are bounded by h2's send buffer
//! (`max_send_buffer_size`), not by a queue in front of it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A `CONNECT` stream's two halves, read and written as bytes.
#[derive(Debug)]
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not read yet.
    buf: Bytes,
    /// This end sent `END_STREAM`.
    sent_end: bool,
    /// The other end's `END_STREAM` was read.
    read_end: bool,
}

/// An HTTP/2 failure as the I/O error a TCP application expects of a
/// connection that was cut: `ConnectionReset`, the cause kept.
fn reset_error(e: h2::Error) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            buf: Bytes::new(),
            sent_end: false,
            read_end: false,
        }
    }

    /// A reset the other end sent, if any, as an error (registers the
    /// waker for one otherwise: call it from the writing side only).
    fn poll_peer_reset(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => Some(reset_error(reason.into())),
            Poll::Ready(Err(e)) => Some(reset_error(e)),
            Poll::Pending => None,
        }
    }
}

impl Drop for H2Stream {
    fn drop(&mut self) {
        // Not ended cleanly both ways: the other end must not take what it
        // got for the whole.
        if !(self.sent_end && self.read_end) {
            self.send.send_reset(Reason::CONNECT_ERROR);
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = &mut *self;
        while me.buf.is_empty() {
            if me.read_end {
                return Poll::Ready(Ok(()));
            }
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(b)) => me.buf = b,
                Some(Err(e)) => return Poll::Ready(Err(reset_error(e))),
                // END_STREAM (a reset reads as `Some(Err)`). No
                // `poll_reset` here: h2 keeps one waker for a stream's
                // sending side, and the reader's would replace a waiting
                // writer's, which would then never wake.
                None => me.read_end = true,
            }
        }
        let n = me.buf.len().min(out.remaining());
        out.put_slice(&me.buf[..n]);
        me.buf.advance(n);
        // Credit goes back as the reader takes bytes: a stopped reader
        // holds at most its stream window.
        let _ = me.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if me.sent_end {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        me.send.reserve_capacity(buf.len());
        let room = loop {
            let room = me.send.capacity();
            if room > 0 {
                break room;
            }
            match me.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(reset_error(e))),
                Poll::Ready(None) => {
                    return Poll::Ready(Err(me.poll_peer_reset(cx).unwrap_or_else(|| {
                        io::Error::new(io::ErrorKind::ConnectionReset, "stream closed")
                    })));
                }
                Poll::Pending => {
                    // Waiting for credit: a reset meanwhile must wake us.
                    if let Some(e) = me.poll_peer_reset(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Pending;
                }
            }
        };
        let n = room.min(buf.len());
        me.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(reset_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what was sent.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if !me.sent_end {
            me.send.send_data(Bytes::new(), true).map_err(reset_error)?;
            me.sent_end = true;
        }
        Poll::Ready(Ok(()))
    }
}
