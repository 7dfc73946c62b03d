//! `jvpn-loadtest bench-streams`: the data plane next to its peers in one
//! run, on one machine, with one server program.
//!
//! Paths, each reached through a SOCKS5 proxy on loopback except the
//! first:
//! - **direct**: the client connects to the server itself;
//! - **jvpn**: `jvpn-agent connect --socks` (a process) → jvpn-router →
//!   jvpn-gateway → server;
//! - **jvpn-gw**: the same without the router (agent → gateway), to show
//!   the cost of the router's hop;
//! - **ssh -D**: Debian OpenSSH's dynamic forwarding through an `sshd`
//!   started for the run (its own config, keys and port).
//!
//! Per path: one stream's download MiB/s, 16 streams' aggregate MiB/s, the
//! CPU the path's processes spent per GiB moved (client and server
//! excluded), and CONNECT-to-first-byte latency (TCP connect to the proxy,
//! SOCKS handshake and CONNECT, one request, its first byte back). All
//! processes share the machine's cores; CPU is accounted from `/proc`
//! instead of pinned.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::bench::cpu_seconds;
use crate::cluster::{LocalCluster, launchers};
use crate::demo::percentiles;
use crate::harness::{GatewayOptions, LocalGateway, TestPki};

#[derive(Clone, Debug)]
pub struct StreamBenchOptions {
    /// Bytes one stream downloads in the one-stream test; the 16-stream
    /// test moves the same total.
    pub bytes: u64,
    /// CONNECT-to-first-byte samples per path.
    pub connects: usize,
    /// Skip `ssh -D` (no `sshd` on this machine).
    pub no_ssh: bool,
    /// Skip the namespace paths: direct over veth, wireguard-go, OpenVPN.
    pub no_vpn: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamPath {
    pub path: String,
    pub one_stream_mib_per_s: f64,
    pub sixteen_streams_mib_per_s: f64,
    /// CPU seconds of the path's own processes per GiB moved (16 streams).
    pub cpu_s_per_gib: f64,
    pub connect_first_byte_us_p50: u64,
    pub connect_first_byte_us_p99: u64,
}

/// jvpn's figures divided by a peer's (throughput: above 1 is better for
/// jvpn; CPU and latency: below 1 is better).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Ratio {
    pub peer: String,
    pub one_stream: f64,
    pub sixteen_streams: f64,
    pub cpu_per_gib: f64,
    pub connect_first_byte_p50: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamBenchReport {
    pub paths: Vec<StreamPath>,
    /// jvpn (agent → router → gateway) against each peer measured.
    pub jvpn_vs: Vec<Ratio>,
    pub jvpn_vs_direct_one_stream: f64,
    pub not_measured: Vec<String>,
}

/// The one server program every path reaches: a request is 8 bytes, the
/// number of bytes to send back; then it sends them and closes.
async fn data_server(l: TcpListener) -> Result<SocketAddr> {
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        let chunk = vec![0x5au8; 256 * 1024];
        while let Ok((mut c, _)) = l.accept().await {
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let _ = c.set_nodelay(true);
                let mut req = [0u8; 8];
                if c.read_exact(&mut req).await.is_err() {
                    return;
                }
                let mut left = u64::from_be_bytes(req);
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    if c.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = c.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// How the client reaches the server.
#[derive(Clone, Debug)]
enum Via {
    Direct,
    /// Through a SOCKS5 proxy (no auth).
    Socks(SocketAddr),
    /// Straight to the server, from inside a network namespace (routed by
    /// that namespace's tunnel).
    Netns(std::sync::Arc<str>),
}

/// A connection to `server` by `via`.
async fn open(via: &Via, server: SocketAddr) -> Result<TcpStream> {
    let p = match via {
        Via::Direct => {
            let c = TcpStream::connect(server).await?;
            c.set_nodelay(true)?;
            return Ok(c);
        }
        Via::Netns(ns) => return crate::bench_peers::connect_in(ns, server).await,
        Via::Socks(p) => *p,
    };
    Ok(crate::socks::connect(p, server).await?)
}

/// Downloads `bytes` over one connection; returns them counted.
async fn download(via: Via, server: SocketAddr, bytes: u64) -> Result<u64> {
    let mut c = open(&via, server).await?;
    c.write_all(&bytes.to_be_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = c.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    if got != bytes {
        bail!("downloaded {got} of {bytes} bytes");
    }
    Ok(got)
}

fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

/// CPU seconds of `pids` and all their descendants (sshd forks a child per
/// connection).
fn cpu_of(pids: &[nix::unistd::Pid]) -> f64 {
    let mut all: Vec<i32> = pids.iter().map(|p| p.as_raw()).collect();
    // Parents before children in /proc order is not guaranteed: repeat
    // until no new descendant appears.
    loop {
        let mut added = false;
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if all.contains(&pid) {
                    continue;
                }
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // ppid is the second field after the ")" that ends the name.
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<i32>().ok());
                if ppid.is_some_and(|p| all.contains(&p)) {
                    all.push(pid);
                    added = true;
                }
            }
        }
        if !added {
            break;
        }
    }
    all.iter().map(|p| on_cpu_seconds(*p)).sum()
}

/// Time on CPU of a process's live threads, in ns resolution from
/// `/proc/PID/task/*/schedstat` (the tick-based figure of `/proc/PID/stat`
/// moves in 10 ms steps, too coarse for a short window: a peer's CPU read
/// 0.0 in one CI run); the tick-based figure where schedstat is missing.
fn on_cpu_seconds(pid: i32) -> f64 {
    let precise = std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum::<u64>()
        });
    match precise {
        Some(ns) if ns > 0 => ns as f64 / 1e9,
        _ => cpu_seconds(nix::unistd::Pid::from_raw(pid)).unwrap_or(0.0),
    }
}

async fn measure(
    name: &str,
    via: Via,
    server: SocketAddr,
    pids: &[nix::unistd::Pid],
    opts: &StreamBenchOptions,
) -> Result<StreamPath> {
    // Warm-up: connections, allocations, TLS sessions already in place.
    download(via.clone(), server, 4 << 20).await?;
    let t = Instant::now();
    let got = download(via.clone(), server, opts.bytes).await?;
    let one = mib_per_s(got, t.elapsed());

    let cpu0 = cpu_of(pids);
    let t = Instant::now();
    let per = opts.bytes / 16;
    let mut tasks = Vec::new();
    for _ in 0..16 {
        tasks.push(tokio::spawn(download(via.clone(), server, per)));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    let sixteen = mib_per_s(total, t.elapsed());
    let cpu = cpu_of(pids) - cpu0;
    let cpu_s_per_gib = cpu / (total as f64 / (1u64 << 30) as f64);

    let mut lat = Vec::with_capacity(opts.connects);
    for _ in 0..opts.connects {
        let t = Instant::now();
        let mut c = open(&via, server).await?;
        c.write_all(&1u64.to_be_bytes()).await?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await?;
        lat.push(t.elapsed().as_micros() as u64);
    }
    let p = percentiles(lat);
    println!(
        "  {name:<12} 1 stream {one:>8.1} MiB/s   16 streams {sixteen:>8.1} MiB/s   \
         CPU {cpu_s_per_gib:>6.2} s/GiB   connect→first byte p50 {} µs p99 {} µs",
        p.p50, p.p99
    );
    Ok(StreamPath {
        path: name.into(),
        one_stream_mib_per_s: one,
        sixteen_streams_mib_per_s: sixteen,
        cpu_s_per_gib,
        connect_first_byte_us_p50: p.p50,
        connect_first_byte_us_p99: p.p99,
    })
}

/// Starts `program args…` and waits for a line on its stdout that
/// `ready` accepts, returning what it extracted.
async fn start_and_read<T>(
    cmd: &mut tokio::process::Command,
    ready: impl Fn(&str) -> Option<T>,
) -> Result<(tokio::process::Child, T)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let out = child.stdout.take().context("no stdout")?;
    let mut lines = tokio::io::BufReader::new(out).lines();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await? {
            if let Some(v) = ready(&l) {
                return Ok::<_, anyhow::Error>(v);
            }
        }
        bail!("exited before it was ready")
    })
    .await
    .context("not ready within 30 s")??;
    // Keep draining its output so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, found))
}

/// `jvpn-agent connect --socks 127.0.0.1:0` as a process; its SOCKS address.
async fn start_agent(
    exe: &Path,
    server: SocketAddr,
    pki: &TestPki,
) -> Result<(tokio::process::Child, SocketAddr)> {
    start_and_read(
        tokio::process::Command::new(exe)
            .arg("agent")
            .arg("connect")
            .arg("--server")
            .arg(server.to_string())
            .arg("--ca")
            .arg(pki.layout.client_ca())
            .arg("--token-file")
            .arg(pki.layout.dev_token())
            .args(["--socks", "127.0.0.1:0"]),
        |l| {
            l.strip_prefix("socks5 and http connect on ")
                .and_then(|a| a.trim().parse::<SocketAddr>().ok())
        },
    )
    .await
}

fn pid_of(c: &tokio::process::Child) -> Result<nix::unistd::Pid> {
    let id = c.id().context("exited")?;
    Ok(nix::unistd::Pid::from_raw(i32::try_from(id)?))
}

/// An `sshd` for the run (own host key, config and port; key login for
/// the current user only) and `ssh -N -D` to it. Returns both children and
/// the SOCKS port.
async fn start_ssh(
    dir: &Path,
) -> Result<(tokio::process::Child, tokio::process::Child, SocketAddr)> {
    let sshd = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("no sshd (apt-get install openssh-server)")?;
    let keygen = |path: &Path| {
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(path)
            .status()
    };
    let host_key = dir.join("host_key");
    let user_key = dir.join("user_key");
    if !keygen(&host_key)?.success() || !keygen(&user_key)?.success() {
        bail!("ssh-keygen failed");
    }
    let auth = dir.join("authorized_keys");
    std::fs::copy(dir.join("user_key.pub"), &auth)?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             PermitRootLogin prohibit-password\nStrictModes no\nAllowTcpForwarding yes\n\
             PidFile {}\n",
            host_key.display(),
            auth.display(),
            dir.join("sshd.pid").display()
        ),
    )?;
    std::fs::create_dir_all("/run/sshd")?;
    let server = tokio::process::Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // sshd is ready when its port accepts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("sshd did not listen on {port}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let socks_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let client = tokio::process::Command::new("ssh")
        .args(["-N", "-i"])
        .arg(&user_key)
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-p",
            &port.to_string(),
            "-D",
            &format!("127.0.0.1:{socks_port}"),
            &format!("{user}@127.0.0.1"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let socks = SocketAddr::from(([127, 0, 0, 1], socks_port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(socks).await.is_err() {
        if Instant::now() > deadline {
            bail!("ssh -D did not listen on {socks}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((server, client, socks))
}

pub async fn run(opts: StreamBenchOptions) -> Result<StreamBenchReport> {
    let server = data_server(TcpListener::bind("127.0.0.1:0").await?).await?;
    let mut report = StreamBenchReport::default();
    println!(
        "bench-streams: {} MiB per test, one server program",
        opts.bytes >> 20
    );
    report
        .paths
        .push(measure("direct", Via::Direct, server, &[], &opts).await?);

    // jvpn: agent process (SOCKS) → router → gateway, all real processes.
    let exe = std::env::current_exe()?;
    let (g, r) = launchers(&exe);
    let g_launcher = g.clone();
    let c = LocalCluster::start(
        g,
        r,
        crate::cluster::ClusterOptions {
            gateways: 1,
            routers: 1,
            spare_gateways: 0,
            gateway_extra_toml: crate::streamload::LOOPBACK_EGRESS.into(),
            ..Default::default()
        },
    )
    .await?;
    let (agent, socks) = start_agent(&exe, c.routers[0].client_addr, &c.pki).await?;
    let mut pids = vec![pid_of(&agent)?];
    pids.extend(c.routers.iter().filter_map(|r| r.pid()));
    pids.extend(c.gateways.iter().filter_map(|(_, g)| g.pid()));
    report
        .paths
        .push(measure("jvpn", Via::Socks(socks), server, &pids, &opts).await?);
    drop(agent);
    drop(c);

    // The same without the router (agent → gateway), to show what the
    // router's hop costs.
    let pki = TestPki::new(&["g1"])?;
    let dir = tempfile::tempdir()?;
    let gw = LocalGateway::start(
        &g_launcher,
        &pki,
        dir.path(),
        &GatewayOptions {
            extra_toml: crate::streamload::LOOPBACK_EGRESS.into(),
            ..Default::default()
        },
    )
    .await?;
    let (agent, socks) = start_agent(&exe, gw.client_addr, &pki).await?;
    let pids = vec![pid_of(&agent)?, gw.pid().context("gateway exited")?];
    report
        .paths
        .push(measure("jvpn-gw", Via::Socks(socks), server, &pids, &opts).await?);
    drop(agent);
    drop(gw);

    if opts.no_ssh {
        report.not_measured.push("ssh -D: --no-ssh".into());
    } else {
        let dir = tempfile::tempdir()?;
        match start_ssh(dir.path()).await {
            Ok((sshd, ssh, socks)) => {
                let pids = vec![pid_of(&sshd)?, pid_of(&ssh)?];
                report
                    .paths
                    .push(measure("ssh -D", Via::Socks(socks), server, &pids, &opts).await?);
            }
            Err(e) => report.not_measured.push(format!("ssh -D: {e:#}")),
        }
    }

    if opts.no_vpn {
        report
            .not_measured
            .push("direct-veth, wireguard-go, OpenVPN-TCP: --no-vpn".into());
    } else if let Err(e) = measure_tunnels(&opts, &mut report).await {
        report
            .not_measured
            .push(format!("direct-veth, wireguard-go, OpenVPN-TCP: {e:#}"));
    }

    let find = |n: &str| report.paths.iter().find(|p| p.path == n).cloned();
    if let (Some(j), Some(d)) = (find("jvpn"), find("direct")) {
        report.jvpn_vs_direct_one_stream = j.one_stream_mib_per_s / d.one_stream_mib_per_s;
    }
    if let Some(j) = find("jvpn") {
        for peer in ["ssh -D", "wireguard-go", "OpenVPN-TCP"] {
            if let Some(p) = find(peer) {
                report.jvpn_vs.push(Ratio {
                    peer: peer.into(),
                    one_stream: j.one_stream_mib_per_s / p.one_stream_mib_per_s,
                    sixteen_streams: j.sixteen_streams_mib_per_s / p.sixteen_streams_mib_per_s,
                    cpu_per_gib: j.cpu_s_per_gib / p.cpu_s_per_gib,
                    connect_first_byte_p50: j.connect_first_byte_us_p50 as f64
                        / p.connect_first_byte_us_p50 as f64,
                });
            }
        }
    }
    Ok(report)
}

/// The paths between two namespaces: direct over the veth (the baseline
/// of the tunnels), wireguard-go and OpenVPN in TCP mode. The same server
/// program, listening inside the server namespace.
async fn measure_tunnels(opts: &StreamBenchOptions, report: &mut StreamBenchReport) -> Result<()> {
    use crate::bench_peers::{NetPair, VETH_SERVER, listen_in, openvpn, wireguard};
    let pair = NetPair::create()?;
    let port = {
        let l = listen_in(&pair.server, SocketAddr::from(([0, 0, 0, 0], 0))).await?;
        data_server(l).await?.port()
    };
    let via = Via::Netns(pair.client.as_str().into());
    report.paths.push(
        measure(
            "direct-veth",
            via.clone(),
            SocketAddr::from((VETH_SERVER, port)),
            &[],
            opts,
        )
        .await?,
    );
    let dir = tempfile::tempdir()?;
    // One tunnel at a time: each is stopped before the next starts.
    let wg = wireguard(&pair, dir.path()).await;
    measure_tunnel("wireguard-go", wg, &via, port, opts, report).await?;
    let ovpn = openvpn(&pair, dir.path()).await;
    measure_tunnel("OpenVPN-TCP", ovpn, &via, port, opts, report).await?;
    Ok(())
}

async fn measure_tunnel(
    name: &str,
    tunnel: Result<crate::bench_peers::Tunnel>,
    via: &Via,
    port: u16,
    opts: &StreamBenchOptions,
    report: &mut StreamBenchReport,
) -> Result<()> {
    match tunnel {
        Ok(t) => {
            let pids: Vec<_> = t.children.iter().filter_map(|c| pid_of(c).ok()).collect();
            let server = SocketAddr::from((t.server_ip, port));
            report
                .paths
                .push(measure(name, via.clone(), server, &pids, opts).await?);
        }
        Err(e) => report.not_measured.push(format!("{name}: {e:#}")),
    }
    Ok(())
}
