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

/// The data plane's HTTP/2 settings, the same at both ends but for how
/// many stopped readers the connection window holds (`h2` has a builder
/// type for each side, with the same methods).
macro_rules! settings {
    ($b:expr, $window:expr, $stalled:expr) => {{
        let (stream, conn) = crate::channel_io::h2_windows($window, $stalled);
        $b.initial_window_size(stream)
            .initial_connection_window_size(conn)
            .max_send_buffer_size(crate::channel_io::H2_SEND_BUF)
            // h2 counts its own resets over the connection's whole life:
            // a session that lives for days would reach any finite limit
            // (test below). Concurrent streams stay bounded by the stream
            // limits, which is what that limit protects.
            .max_local_error_reset_streams(None)
            // A CONNECT and its answer need a few hundred bytes; h2's
            // default (16 MiB) let one pending request hold that much.
            .max_header_list_size(MAX_HEADER_LIST);
    }};
}

/// The decoded headers one request or response may carry.
pub const MAX_HEADER_LIST: u32 = 16 * 1024;

/// The gateway's HTTP/2 server over a channel of `window` bytes.
pub fn server_builder(window: u64) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    settings!(b, window, crate::channel_io::GATEWAY_STALLED_STREAMS);
    b
}

/// The agent's HTTP/2 client over a channel of `window` bytes.
pub fn client_builder(window: u64) -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    settings!(b, window, crate::channel_io::AGENT_STALLED_STREAMS);
    b
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP/2 frame: 9-byte header, then the payload.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// Frames from a raw peer until one of `kind` arrives; panics on a
    /// GOAWAY (its debug data in the message) or the end of the stream.
    async fn until(raw: &mut tokio::io::DuplexStream, kind: u8) {
        loop {
            let mut h = [0u8; 9];
            raw.read_exact(&mut h).await.expect("connection ended");
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let mut p = vec![0; len];
            raw.read_exact(&mut p).await.unwrap();
            if h[3] == 0x7 {
                panic!("GOAWAY: {}", String::from_utf8_lossy(&p[8..]));
            }
            if h[3] == kind {
                return;
            }
        }
    }

    /// h2 counts every reset it makes itself over a connection's life and
    /// ends the connection after 1,024 (`max_local_error_reset_streams`).
    /// One such reset answers each `DATA` frame that arrives for a stream
    /// this end reset and has already forgotten, which an application
    /// closing a download whose bytes are in flight produces; a transport
    /// outage makes them later still. A session lives for days: a lifetime
    /// count would end it, and every stream in it, for ordinary traffic.
    /// (A peer's concurrent work stays bounded by the stream limits.)
    #[tokio::test]
    async fn late_data_for_forgotten_streams_does_not_end_the_connection() {
        let (io, mut raw) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = server_builder(1 << 20).handshake::<_, Bytes>(io).await?;
            while let Some(r) = conn.accept().await {
                let (_req, mut respond) = r?;
                // As a stream whose application went away does.
                respond.send_reset(Reason::CANCEL);
            }
            Ok::<(), h2::Error>(())
        });
        raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        raw.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
        // `:method CONNECT`, `:authority example:80`, literal, not indexed.
        let mut block = vec![0x02, 7];
        block.extend(b"CONNECT");
        block.extend([0x01, 10]);
        block.extend(b"example:80");
        let streams = 1_500u32;
        for i in 0..streams {
            // END_HEADERS; each stream is reset before the next opens.
            raw.write_all(&frame(0x1, 0x4, 2 * i + 1, &block))
                .await
                .unwrap();
            until(&mut raw, 0x3).await;
        }
        // Bytes each stream had in flight, arriving after all the resets.
        // (A write fails once the server has gone: its GOAWAY says why.)
        for i in 0..streams {
            let data = frame(0x0, 0, 2 * i + 1, b"late");
            if raw.write_all(&data).await.is_err() {
                break;
            }
        }
        // The connection still answers.
        let _ = raw.write_all(&frame(0x6, 0, 0, &[0; 8])).await;
        until(&mut raw, 0x6).await;
        drop(raw);
        let _ = server.await.unwrap();
    }

    /// A request's headers are bounded: h2's default (16 MiB of decoded
    /// headers) let one pending CONNECT hold that much of a gateway's
    /// memory until its dial ended. A CONNECT needs a few hundred bytes.
    #[tokio::test]
    async fn a_request_with_oversized_headers_is_refused() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move {
            let mut conn = server_builder(1 << 20).handshake::<_, Bytes>(a).await?;
            let mut accepted = 0;
            while let Some(r) = conn.accept().await {
                let (_req, mut respond) = r?;
                accepted += 1;
                let ok = http::Response::new(());
                let _ = respond.send_response(ok, true);
            }
            Ok::<usize, h2::Error>(accepted)
        });
        let (send, conn) = client_builder(1 << 20)
            .handshake::<_, Bytes>(b)
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        let connect = |extra: usize| {
            let mut req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri("example:80");
            if extra > 0 {
                req = req.header("x-padding", "p".repeat(extra));
            }
            req.body(()).unwrap()
        };
        let mut send = send.ready().await.unwrap();
        // Just over the bound. (Far over it, h2 ends the connection as a
        // CONTINUATION flood: this agent's own session only.)
        let extra = MAX_HEADER_LIST as usize + 1024;
        let (big, _) = send.send_request(connect(extra), false).unwrap();
        match big.await {
            Ok(r) => assert_eq!(
                r.status(),
                http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            ),
            Err(e) => assert!(e.is_reset() || e.is_remote(), "{e}"),
        }
        // The connection goes on: a normal CONNECT still answers.
        let mut send = send.ready().await.unwrap();
        let (small, _) = send.send_request(connect(0), false).unwrap();
        assert_eq!(small.await.unwrap().status(), http::StatusCode::OK);
        drop(send);
        conn.abort();
        let accepted = server.await.unwrap().unwrap_or(1);
        assert_eq!(
            accepted, 1,
            "only the small request reached the application"
        );
    }
}
