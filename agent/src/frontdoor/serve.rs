//! The listeners: a proxy port that speaks SOCKS5 and HTTP `CONNECT` (told
//! apart by the first byte: SOCKS5 starts with 5, HTTP with a letter) and
//! fixed forwards (`--forward LOCAL=HOST:PORT`, like `ssh -L`). Each
//! accepted connection becomes one stream through the session.
//!
//! A stream that ends with an error (its session ended, its channel broke)
//! resets the application's connection (RST), so no application mistakes
//! a cut transfer for a complete one.

use std::io;
use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use jvpn_proto::stream::{Refusal, Target};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{http_connect, socks5};
use crate::streams::{StreamError, Tunnel};

/// Why a listen address was refused.
#[derive(Debug, thiserror::Error)]
#[error("{addr}: not a loopback address; pass --allow-non-loopback to serve other hosts")]
pub struct NotLoopback {
    pub addr: SocketAddr,
}

/// Front doors listen on loopback unless the operator says otherwise: an
/// open proxy on a LAN would let anyone there use the session.
pub fn check_bind(addr: SocketAddr, allow_non_loopback: bool) -> Result<(), NotLoopback> {
    if addr.ip().is_loopback() || allow_non_loopback {
        Ok(())
    } else {
        Err(NotLoopback { addr })
    }
}

/// Serves SOCKS5 and HTTP `CONNECT` on `listener` until the task is dropped.
pub async fn serve_proxy(listener: TcpListener, tunnel: Tunnel) {
    loop {
        let Ok((c, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        };
        let tunnel = tunnel.clone();
        tokio::spawn(async move {
            let _ = c.set_nodelay(true);
            let _ = proxy_conn(c, &tunnel).await;
        });
    }
}

/// Serves a fixed forward: every connection on `listener` becomes a stream
/// to `target`.
pub async fn serve_forward(listener: TcpListener, tunnel: Tunnel, target: Target) {
    loop {
        let Ok((c, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            continue;
        };
        let tunnel = tunnel.clone();
        let target = target.clone();
        tokio::spawn(async move {
            let _ = c.set_nodelay(true);
            match tunnel.connect(&target).await {
                Ok(s) => splice(c, s, &tunnel, BytesMut::new()).await,
                // Nothing to answer in a raw forward: the application sees a reset.
                Err(_) => reset(c),
            }
        });
    }
}

/// Reads more of the request; an EOF before it is complete is an error.
async fn read_more(c: &mut TcpStream, buf: &mut BytesMut) -> io::Result<()> {
    if c.read_buf(buf).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn proxy_conn(mut c: TcpStream, tunnel: &Tunnel) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(1024);
    read_more(&mut c, &mut buf).await?;
    if buf[0] == 5 {
        socks(c, buf, tunnel).await
    } else {
        http(c, buf, tunnel).await
    }
}

async fn socks(mut c: TcpStream, mut buf: BytesMut, tunnel: &Tunnel) -> io::Result<()> {
    loop {
        match socks5::parse_greeting(&buf) {
            Ok(Some(n)) => {
                buf.advance(n);
                break;
            }
            Ok(None) => read_more(&mut c, &mut buf).await?,
            Err(e) => return answer_and_close(c, e.reply()).await,
        }
    }
    c.write_all(&socks5::METHOD_REPLY).await?;
    let target = loop {
        match socks5::parse_request(&buf) {
            Ok(Some((t, n))) => {
                buf.advance(n);
                break t;
            }
            Ok(None) => read_more(&mut c, &mut buf).await?,
            Err(e) => return answer_and_close(c, e.reply()).await,
        }
    };
    match tunnel.connect(&target).await {
        Ok(s) => {
            c.write_all(&socks5::success()).await?;
            splice(c, s, tunnel, buf).await;
            Ok(())
        }
        Err(e) => {
            let code = socks5::refusal_code(refusal_of(&e));
            answer_and_close(c, Some(socks5::reply(code))).await
        }
    }
}

async fn http(mut c: TcpStream, mut buf: BytesMut, tunnel: &Tunnel) -> io::Result<()> {
    let (target, n) = loop {
        match http_connect::parse(&buf) {
            Ok(Some(x)) => break x,
            Ok(None) => read_more(&mut c, &mut buf).await?,
            Err(e) => return answer_and_close(c, Some(e.response())).await,
        }
    };
    buf.advance(n);
    match tunnel.connect(&target).await {
        Ok(s) => {
            c.write_all(&http_connect::established()).await?;
            splice(c, s, tunnel, buf).await;
            Ok(())
        }
        Err(e) => answer_and_close(c, Some(http_connect::refused(refusal_of(&e)))).await,
    }
}

/// What the application is told when a stream could not be opened.
fn refusal_of(e: &StreamError) -> Refusal {
    match e {
        StreamError::Refused(r) => *r,
        // No session to carry it: the network is, for now, unreachable.
        StreamError::NoSession(_) | StreamError::SessionEnded(_) | StreamError::Stopped => {
            Refusal::NetworkUnreachable
        }
    }
}

async fn answer_and_close(mut c: TcpStream, reply: Option<Vec<u8>>) -> io::Result<()> {
    if let Some(r) = reply {
        c.write_all(&r).await?;
    }
    c.shutdown().await
}

/// Closes with RST (SO_LINGER 0): the application sees a reset.
fn reset(c: TcpStream) {
    // A zero linger never blocks on drop (the deprecation is about > 0).
    #[allow(deprecated)]
    let _ = c.set_linger(Some(std::time::Duration::ZERO));
}

/// Joins the application's connection and its stream until both
/// directions ended (half-closes travel); the first error resets the
/// application's connection (it sees RST) and is counted.
async fn splice<S>(c: TcpStream, s: S, tunnel: &Tunnel, early: BytesMut)
where
    S: AsyncRead + AsyncWrite,
{
    let r = jvpn_runtime::relay::relay(c, s, &early, &|_, _| std::time::Duration::ZERO).await;
    if r.reset {
        tunnel.count_reset();
    }
}
