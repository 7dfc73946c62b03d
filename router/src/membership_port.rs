//! The membership port's accept loop: a per-source cap on open connections,
//! checked before any TLS work, so a flood of idle or half-open connections
//! from one address cannot exhaust the router or crowd out the gateways
//! (each gateway needs one connection per router).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use jvpn_runtime::admission::SourceKey;
use jvpn_runtime::wire::accept_until;
use metrics::counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics as m;
use crate::state::{RouterState, Slot};

/// A membership connection holding its slot until dropped.
#[derive(Debug)]
pub struct Capped {
    inner: TcpStream,
    slot: Option<Slot>,
    state: Arc<RouterState>,
}

impl Drop for Capped {
    fn drop(&mut self) {
        if let Some(s) = self.slot.take() {
            self.state.release_membership(s);
        }
    }
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts on `listener` until `stop`, closing connections over the cap at
/// once; the rest go to the gRPC server through the returned stream.
pub fn incoming(
    listener: TcpListener,
    state: Arc<RouterState>,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<Capped>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some((stream, peer)) = accept_until(&listener, &mut stop).await {
            let Some(slot) = state.admit_membership(SourceKey::from(peer.ip())) else {
                counter!(m::MEMBERSHIP_CONNECTIONS_REFUSED).increment(1);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let conn = Capped {
                inner: stream,
                slot: Some(slot),
                state: state.clone(),
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}
