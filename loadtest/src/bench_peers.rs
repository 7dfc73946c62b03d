//! The layer-3 peers of `bench-streams`: OpenVPN in TCP mode and
//! wireguard-go (Debian packages), each between two network namespaces the
//! benchmark creates and deletes (root only).
//!
//! Layout: a client namespace and a server namespace joined by a veth pair
//! (MTU 65,535, so the wire itself is as wide as loopback). The tunnel
//! programs run inside them with their own tun devices at the packages'
//! default MTUs (OpenVPN 1,500, WireGuard 1,420), as users deploy them. The
//! benchmark's client creates its sockets inside the client namespace and
//! its server listens inside the server namespace: a socket stays in the
//! namespace it was created in, so one process drives every path.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::run;

/// The server's end of the veth pair; the client's end is `.2`.
pub const VETH_SERVER: Ipv4Addr = Ipv4Addr::new(10, 204, 0, 1);
const VETH_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 204, 0, 2);
/// Tunnel addresses: the server's inside end of each tunnel.
pub const WG_SERVER: Ipv4Addr = Ipv4Addr::new(10, 205, 0, 1);
const WG_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 205, 0, 2);
pub const OVPN_SERVER: Ipv4Addr = Ipv4Addr::new(10, 206, 0, 1);
const OVPN_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 206, 0, 2);

/// Runs `f` on the calling thread inside namespace `name`, then moves the
/// thread back. Call it from a blocking thread, never a runtime worker.
pub fn in_netns<T>(name: &str, f: impl FnOnce() -> std::io::Result<T>) -> Result<T> {
    use nix::sched::{CloneFlags, setns};
    let home = File::open("/proc/thread-self/ns/net")?;
    let target =
        File::open(format!("/run/netns/{name}")).with_context(|| format!("namespace {name}"))?;
    setns(&target, CloneFlags::CLONE_NEWNET).context("setns needs root")?;
    let r = f();
    if let Err(e) = setns(&home, CloneFlags::CLONE_NEWNET) {
        // A worker left in the wrong namespace would corrupt every later
        // measurement silently.
        panic!("cannot return to the original network namespace: {e}");
    }
    Ok(r?)
}

/// A tokio listener bound inside namespace `name`.
pub async fn listen_in(name: &str, addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let n = name.to_string();
    let l = tokio::task::spawn_blocking(move || in_netns(&n, || std::net::TcpListener::bind(addr)))
        .await??;
    l.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(l)?)
}

/// A tokio connection made from inside namespace `name`.
pub async fn connect_in(name: &str, to: SocketAddr) -> Result<tokio::net::TcpStream> {
    let n = name.to_string();
    let c = tokio::task::spawn_blocking(move || {
        in_netns(&n, || {
            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10))
        })
    })
    .await??;
    c.set_nonblocking(true)?;
    let c = tokio::net::TcpStream::from_std(c)?;
    c.set_nodelay(true)?;
    Ok(c)
}

/// A port nothing listens on yet inside namespace `name` (the tunnel
/// programs take a port number, not port 0).
fn free_port(name: &str, udp: bool) -> Result<u16> {
    in_netns(name, || {
        let any = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        if udp {
            std::net::UdpSocket::bind(any)?.local_addr()
        } else {
            std::net::TcpListener::bind(any)?.local_addr()
        }
    })
    .map(|a| a.port())
}

/// The client and server namespaces and their veth link. Deleted on drop.
#[derive(Debug)]
pub struct NetPair {
    pub client: String,
    pub server: String,
    tag: String,
}

impl NetPair {
    pub fn create() -> Result<Self> {
        let tag = format!("{}", std::process::id() % 100_000);
        let pair = Self {
            client: format!("jvpnb-c{tag}"),
            server: format!("jvpnb-s{tag}"),
            tag,
        };
        run("ip", &["netns", "add", &pair.client])
            .context("network namespaces and tun devices need root")?;
        run("ip", &["netns", "add", &pair.server])?;
        let (c_if, s_if) = (format!("jbc{}", pair.tag), format!("jbs{}", pair.tag));
        run(
            "ip",
            &[
                "link",
                "add",
                &c_if,
                "netns",
                &pair.client,
                "type",
                "veth",
                "peer",
                "name",
                &s_if,
                "netns",
                &pair.server,
            ],
        )?;
        for (ns, dev, ip) in [
            (&pair.client, &c_if, VETH_CLIENT),
            (&pair.server, &s_if, VETH_SERVER),
        ] {
            let cidr = format!("{ip}/24");
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", ns, "addr", "add", &cidr, "dev", dev])?;
            run("ip", &["-n", ns, "link", "set", dev, "mtu", "65535", "up"])?;
        }
        Ok(pair)
    }

    fn spawn(&self, ns: &str, program: &str, args: &[&str]) -> Result<tokio::process::Child> {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", ns, program]).args(args);
        c.env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        c.spawn().with_context(|| format!("starting {program}"))
    }

    fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", ns, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // Deleting a namespace also removes its veth end and tun devices.
        let _ = run("ip", &["netns", "del", &self.client]);
        let _ = run("ip", &["netns", "del", &self.server]);
    }
}

/// A running tunnel: its processes (killed on drop) and the address of the
/// server's inside end.
#[derive(Debug)]
pub struct Tunnel {
    pub children: Vec<tokio::process::Child>,
    pub server_ip: Ipv4Addr,
    uapi: Vec<std::path::PathBuf>,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for p in &self.uapi {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn wait_for(path: &Path, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{what} did not start within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// wireguard-go at both ends (userspace WireGuard, as the issue asks; the
/// kernel module is not used), keys minted for the run.
pub async fn wireguard(pair: &NetPair, dir: &Path) -> Result<Tunnel> {
    let key = |name: &str| -> Result<(std::path::PathBuf, String)> {
        let private = run("wg", &["genkey"]).context("wg (apt-get install wireguard-tools)")?;
        let path = dir.join(format!("{name}.key"));
        std::fs::write(&path, private.trim())?;
        let mut p = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        use std::io::Write;
        p.stdin
            .take()
            .context("stdin")?
            .write_all(private.as_bytes())?;
        let out = p.wait_with_output()?;
        Ok((
            path,
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    };
    let (s_key, s_pub) = key("server")?;
    let (c_key, c_pub) = key("client")?;
    let (s_if, c_if) = (format!("jwgs{}", pair.tag), format!("jwgc{}", pair.tag));
    let mut t = Tunnel {
        children: Vec::new(),
        server_ip: WG_SERVER,
        uapi: Vec::new(),
    };
    for (ns, dev) in [(&pair.server, &s_if), (&pair.client, &c_if)] {
        t.children.push(
            pair.spawn(ns, "wireguard-go", &["-f", dev])
                .context("wireguard-go (apt-get install wireguard-go)")?,
        );
        let sock = Path::new("/var/run/wireguard").join(format!("{dev}.sock"));
        t.uapi.push(sock.clone());
        wait_for(&sock, "wireguard-go").await?;
    }
    let port = free_port(&pair.server, true)?.to_string();
    let endpoint = format!("{VETH_SERVER}:{port}");
    let (s_allowed, c_allowed) = (format!("{WG_CLIENT}/32"), format!("{WG_SERVER}/32"));
    pair.exec(
        &pair.server,
        "wg",
        &[
            "set",
            &s_if,
            "private-key",
            &s_key.to_string_lossy(),
            "listen-port",
            &port,
            "peer",
            &c_pub,
            "allowed-ips",
            &s_allowed,
        ],
    )?;
    pair.exec(
        &pair.client,
        "wg",
        &[
            "set",
            &c_if,
            "private-key",
            &c_key.to_string_lossy(),
            "peer",
            &s_pub,
            "endpoint",
            &endpoint,
            "allowed-ips",
            &c_allowed,
        ],
    )?;
    for (ns, dev, ip) in [
        (&pair.server, &s_if, WG_SERVER),
        (&pair.client, &c_if, WG_CLIENT),
    ] {
        let cidr = format!("{ip}/24");
        run("ip", &["-n", ns, "addr", "add", &cidr, "dev", dev])?;
        run("ip", &["-n", ns, "link", "set", dev, "up"])?;
    }
    Ok(t)
}

/// OpenVPN in TCP mode, point to point with TLS (certificates minted with
/// the openssl command for the run; the data channel negotiates its default
/// cipher, AES-256-GCM). `TCP_NODELAY` on both ends, as OpenVPN's manual
/// advises for TCP: without it a small request waits out delayed ACKs.
pub async fn openvpn(pair: &NetPair, dir: &Path) -> Result<Tunnel> {
    let ossl = |args: &[&str]| -> Result<()> {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("openssl")?;
        if !st.success() {
            bail!("openssl {} failed", args.join(" "));
        }
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=bench-ca",
    ]);
    ossl(&ca)?;
    for n in ["server", "client"] {
        let (k, csr, pem, subj) = (
            format!("{n}.key"),
            format!("{n}.csr"),
            format!("{n}.pem"),
            format!("/CN={n}"),
        );
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &k, "-out", &csr, "-subj", &subj]);
        ossl(&req)?;
        ossl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
        ])?;
    }
    let port = free_port(&pair.server, false)?;
    let common = |n: &str| {
        format!(
            "dev-type tun\nsocket-flags TCP_NODELAY\nca {d}/ca.pem\ncert {d}/{n}.pem\nkey {d}/{n}.key\nverb 3\n",
            d = dir.display()
        )
    };
    let server_cfg = dir.join("server.conf");
    std::fs::write(
        &server_cfg,
        format!(
            "dev jovs{tag}\nproto tcp-server\nlocal {VETH_SERVER}\nlport {port}\n\
             ifconfig {OVPN_SERVER} {OVPN_CLIENT}\ntls-server\ndh none\n{}",
            common("server"),
            tag = pair.tag
        ),
    )?;
    let client_cfg = dir.join("client.conf");
    std::fs::write(
        &client_cfg,
        format!(
            "dev jovc{tag}\nproto tcp-client\nremote {VETH_SERVER} {port}\nnobind\n\
             ifconfig {OVPN_CLIENT} {OVPN_SERVER}\ntls-client\n{}",
            common("client"),
            tag = pair.tag
        ),
    )?;
    let ready = |c: &mut tokio::process::Child| {
        let out = c.stdout.take();
        async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(out.context("no stdout")?).lines();
            while let Some(l) = lines.next_line().await? {
                if l.contains("Initialization Sequence Completed") {
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return Ok::<_, anyhow::Error>(());
                }
            }
            bail!("openvpn exited before it was ready")
        }
    };
    let cfg = |p: &Path| p.to_string_lossy().into_owned();
    let mut server = pair
        .spawn(&pair.server, "openvpn", &["--config", &cfg(&server_cfg)])
        .context("openvpn (apt-get install openvpn)")?;
    let mut client = pair.spawn(&pair.client, "openvpn", &["--config", &cfg(&client_cfg)])?;
    let (s, c) = (ready(&mut server), ready(&mut client));
    tokio::time::timeout(Duration::from_secs(30), async { tokio::try_join!(s, c) })
        .await
        .context("openvpn not connected within 30 s")??;
    Ok(Tunnel {
        children: vec![server, client],
        server_ip: OVPN_SERVER,
        uapi: Vec::new(),
    })
}
