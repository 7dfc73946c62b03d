//! Events to a syslog collector (SIEM): RFC 5424 messages over TCP with
//! octet counting (RFC 6587), optionally in TLS. Behind a bounded queue of
//! its own: a slow, dead or stalled collector drops events (counted), never
//! slows a session and never holds back the event file.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::metrics as m;

/// Facility local0, severity informational.
const PRI: u8 = 16 * 8 + 6;
/// Bytes written per batch at most.
const BATCH_MAX: usize = 64 * 1024;
/// A collector that takes longer to accept a connection or a batch is
/// treated as dead for that batch.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to send.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port`, resolved at each connection.
    pub addr: String,
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

enum Item {
    Frame(Vec<u8>),
    /// Send everything queued before this, then answer.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The sending side: what [`crate::events::EventSink`] holds.
#[derive(Clone, Debug)]
pub struct Syslog {
    tx: mpsc::Sender<Item>,
    host: String,
    pid: u32,
}

impl Syslog {
    /// Starts the sender task. Needs a tokio runtime.
    pub fn start(target: Target, capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        tokio::spawn(send_loop(target, rx));
        Self {
            tx,
            host: hostname(),
            pid: std::process::id(),
        }
    }

    /// Queues one event (its JSON line); never waits.
    pub fn send(&self, kind: &str, ts_ms: u64, json: &str) {
        let frame = frame(&self.host, self.pid, kind, ts_ms, json);
        if self.tx.try_send(Item::Frame(frame)).is_err() {
            metrics::counter!(m::SYSLOG_DROPPED).increment(1);
        }
    }

    /// Waits (at most `within`) until what was queued so far is sent; what
    /// is still queued then is counted as dropped (the process is stopping).
    pub async fn flush(&self, within: Duration) {
        let (done, wait) = tokio::sync::oneshot::channel();
        let sent = tokio::time::timeout(within, async {
            self.tx.send(Item::Flush(done)).await.is_ok() && wait.await.is_ok()
        })
        .await;
        if !matches!(sent, Ok(true)) {
            let queued = self.tx.max_capacity() - self.tx.capacity();
            metrics::counter!(m::SYSLOG_DROPPED).increment(queued as u64);
        }
    }
}

/// This host's name as RFC 5424 wants it (printable ASCII, no spaces, at
/// most 255 characters), or `-`.
fn hostname() -> String {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let h: String = h
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    if h.is_empty() { "-".to_owned() } else { h }
}

/// One octet-counted RFC 5424 message: the event's type is the MSGID, the
/// JSON event is the MSG (UTF-8, as written to the event file).
pub fn frame(host: &str, pid: u32, kind: &str, ts_ms: u64, json: &str) -> Vec<u8> {
    let ts = crate::timeline::format_time(ts_ms.saturating_mul(1_000_000));
    let msgid: String = kind
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect();
    let msg = format!("<{PRI}>1 {ts} {host} jvpn-gateway {pid} {msgid} - {json}");
    let mut out = Vec::with_capacity(msg.len() + 8);
    out.extend_from_slice(msg.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg.as_bytes());
    out
}

type Conn = Box<dyn AsyncWrite + Unpin + Send>;

/// Kernel send buffer for the collector's connection: bounded, so a
/// collector that stops reading is noticed (the write times out) after
/// this much instead of after megabytes of autotuned buffer; large enough
/// for thousands of events a second over a WAN round trip.
const SEND_BUFFER: u32 = 128 * 1024;

async fn tcp(addr: &str) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::from(std::io::ErrorKind::AddrNotAvailable);
    for a in tokio::net::lookup_host(addr).await? {
        let sock = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_send_buffer_size(SEND_BUFFER)?;
        match sock.connect(a).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn connect(t: &Target) -> std::io::Result<Conn> {
    let tcp = tokio::time::timeout(IO_TIMEOUT, tcp(&t.addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = tcp.set_nodelay(true);
    Ok(match &t.tls {
        None => Box::new(tcp),
        Some((cfg, name)) => {
            let tls = tokio_rustls::TlsConnector::from(cfg.clone());
            let s = tokio::time::timeout(IO_TIMEOUT, tls.connect(name.clone(), tcp))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            Box::new(s)
        }
    })
}

async fn send_loop(target: Target, mut rx: mpsc::Receiver<Item>) {
    let mut conn: Option<Conn> = None;
    let mut backoff = Duration::from_millis(100);
    let mut batch: Vec<u8> = Vec::new();
    let mut in_batch = 0u64;
    // A flush waiting for the batch in hand to be sent (or dropped).
    let mut flush: Option<tokio::sync::oneshot::Sender<()>> = None;
    // Says once per outage why the collector cannot be reached.
    let mut outage_told = false;
    loop {
        if in_batch == 0 {
            if let Some(done) = flush.take() {
                let _ = done.send(());
            }
            match rx.recv().await {
                None => break,
                Some(Item::Flush(done)) => {
                    let _ = done.send(());
                    continue;
                }
                Some(Item::Frame(first)) => {
                    batch = first;
                    in_batch = 1;
                }
            }
            while batch.len() < BATCH_MAX {
                match rx.try_recv() {
                    Ok(Item::Frame(more)) => {
                        batch.extend_from_slice(&more);
                        in_batch += 1;
                    }
                    Ok(Item::Flush(done)) => {
                        flush = Some(done);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(&target).await {
                Ok(c) => {
                    tracing::info!("syslog collector connected");
                    metrics::gauge!(m::SYSLOG_CONNECTED).set(1.0);
                    backoff = Duration::from_millis(100);
                    outage_told = false;
                    conn.insert(c)
                }
                Err(e) => {
                    // Nothing of this batch was sent: it waits for the next
                    // connection while newer events queue (then drop).
                    if !outage_told {
                        tracing::warn!(error = %e, addr = %target.addr, "syslog collector unreachable; retrying, events queue then drop");
                        outage_told = true;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        let sent = tokio::time::timeout(IO_TIMEOUT, async {
            c.write_all(&batch).await?;
            c.flush().await
        })
        .await;
        match sent {
            Ok(Ok(())) => metrics::counter!(m::SYSLOG_SENT).increment(in_batch),
            Ok(Err(e)) => {
                // Part of the batch may have arrived: dropped rather than
                // sent twice.
                tracing::warn!(error = %e, "syslog collector broke; reconnecting");
                metrics::counter!(m::SYSLOG_DROPPED).increment(in_batch);
                metrics::gauge!(m::SYSLOG_CONNECTED).set(0.0);
                conn = None;
            }
            Err(_) => {
                tracing::warn!("syslog collector stalled for 5 s; reconnecting");
                metrics::counter!(m::SYSLOG_DROPPED).increment(in_batch);
                metrics::gauge!(m::SYSLOG_CONNECTED).set(0.0);
                conn = None;
            }
        }
        in_batch = 0;
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_frame_is_octet_counted_rfc5424() {
        let f = super::frame(
            "gw-host",
            42,
            "SessionStateChange",
            1_733_333_333_123,
            "{\"a\":\"é\"}",
        );
        let text = String::from_utf8(f).unwrap();
        let (len, msg) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        assert_eq!(
            msg,
            "<134>1 2024-12-04T17:28:53.123Z gw-host jvpn-gateway 42 SessionStateChange - {\"a\":\"é\"}"
        );
    }
}
