//! A minimal SOCKS5 client (no authentication, CONNECT to an IPv4 or IPv6
//! address): how the load tool and the benchmarks reach destinations
//! through an agent's front door or `ssh -D`, as an application would.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum SocksError {
    #[error("proxy I/O: {0}")]
    Io(#[from] io::Error),
    #[error("proxy answered method {0:?}, not 'no authentication'")]
    Method([u8; 2]),
    /// The proxy refused the CONNECT with this reply code (RFC 1928 §6).
    #[error("proxy refused the CONNECT with reply code {0}")]
    Refused(u8),
}

/// A stream to `to` through the SOCKS5 proxy at `proxy`, ready for data.
pub async fn connect(proxy: SocketAddr, to: SocketAddr) -> Result<TcpStream, SocksError> {
    let mut c = TcpStream::connect(proxy).await?;
    c.set_nodelay(true)?;
    c.write_all(&[5, 1, 0]).await?;
    let mut m = [0u8; 2];
    c.read_exact(&mut m).await?;
    if m != [5, 0] {
        return Err(SocksError::Method(m));
    }
    let mut req = vec![5, 1, 0];
    match to {
        SocketAddr::V4(a) => {
            req.push(1);
            req.extend_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            req.push(4);
            req.extend_from_slice(&a.ip().octets());
        }
    }
    req.extend_from_slice(&to.port().to_be_bytes());
    c.write_all(&req).await?;
    // Reply: VER REP RSV ATYP, then a bound address whose length ATYP
    // gives, and a port.
    let mut head = [0u8; 4];
    c.read_exact(&mut head).await?;
    if head[1] != 0 {
        return Err(SocksError::Refused(head[1]));
    }
    let addr_len = match head[3] {
        1 => 4,
        4 => 16,
        3 => usize::from(c.read_u8().await?),
        _ => return Err(SocksError::Refused(head[1])),
    };
    let mut rest = vec![0u8; addr_len + 2];
    c.read_exact(&mut rest).await?;
    Ok(c)
}
