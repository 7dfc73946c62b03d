//! Egress policy (seed §2 "Policy Engine", DESIGN §12), sans-IO: may this
//! session's principal open a stream to this *resolved* address and port?
//! Names are resolved first and every address is checked, so a name cannot
//! smuggle a destination the rules would refuse as an address.
//!
//! Rules are `[[egress.rules]]`, first match wins, no match is a refusal.
//! Some destinations are protected whatever the rules say in general:
//! loopback, link-local (cloud metadata lives at 169.254.169.254),
//! multicast, the unspecified/"this network" addresses (a connect to
//! 0.0.0.0 reaches the local host on Linux), cloud metadata services
//! outside link-local, IPv6 transition prefixes that embed IPv4 (6to4,
//! local-use NAT64), and this gateway's own listeners. The well-known NAT64
//! prefix `64:ff9b::/96` is checked as the IPv4 address it embeds. A rule opens a protected range only by naming it: its CIDR
//! must lie inside that range (`127.0.0.0/8` opens loopback,
//! `0.0.0.0/0` does not), and a cluster listener only by a rule for that
//! very host (`/32` or `/128`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use jvpn_runtime::config::ConfigProblem;
use serde::{Deserialize, Serialize};

/// `[egress]` as written.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Rules in order; the first whose principals, CIDR and ports match
    /// decides. Default: one rule allowing every principal everywhere
    /// (protected ranges stay closed).
    pub rules: Vec<RuleConfig>,
    /// How long a stream's TCP connect to its destination may take.
    pub connect_timeout_ms: u64,
    /// Streams one session may have open at once (more are refused with
    /// `too_many_streams`), at most [`MAX_STREAMS_CEILING`].
    pub max_streams_per_session: usize,
    /// Streams the whole gateway may have open at once, each a socket to
    /// its destination (more are refused with `too_many_streams`); 0: half
    /// the process's open-file limit, so sessions, handshakes and the
    /// membership keep descriptors whatever agents open.
    pub max_streams: usize,
    /// Streams one principal may have open at once, all its sessions
    /// together (more are refused with `too_many_streams`): one credential
    /// cannot take the whole gateway's limit. 0: no limit of its own.
    pub max_streams_per_principal: usize,
    /// Unacknowledged bytes each side of a session's channel may hold, per
    /// direction: the memory a busy session costs, and its throughput cap
    /// per round trip.
    pub window_bytes: u64,
    /// Stream bytes per second one principal may move, both directions
    /// and all its sessions together (a token bucket); 0 = no limit.
    pub principal_bytes_per_s: u64,
    /// The bucket's depth: bytes a principal may move at once after idling.
    pub principal_burst_bytes: u64,
    /// `[[egress.limits]]`: limits of their own for the principals they
    /// name; what an entry leaves out is the `[egress]` value above.
    pub limits: Vec<LimitsConfig>,
}

/// One `[[egress.limits]]` entry as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// The principals these limits are for (each in one entry at most).
    pub principals: Vec<String>,
    /// Their `max_streams_per_principal` (0: no limit of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_streams: Option<usize>,
    /// Their `principal_bytes_per_s` (0: no rate limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_s: Option<u64>,
    /// Their `principal_burst_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_bytes: Option<u64>,
    /// Their `connect_timeout_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
}

/// What one principal's streams may do, compiled: `[egress]`'s values, or
/// those of the `[[egress.limits]]` entry naming it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Streams open at once, all the principal's sessions together
    /// (`usize::MAX`: no limit of its own).
    pub max_streams: usize,
    /// `None`: no rate limit; else (bytes/s, burst bytes).
    pub rate: Option<(u64, u64)>,
    /// Name resolution plus the TCP connect to a destination.
    pub connect_timeout: std::time::Duration,
}

/// Half the process's soft open-file limit (at least 1): the default cap
/// on the gateway's egress sockets.
fn half_the_open_file_limit() -> usize {
    let soft = jvpn_runtime::process::open_file_limit();
    usize::try_from(soft / 2).unwrap_or(usize::MAX).max(1)
}

/// Bounds of `egress.window_bytes`: at least a few frames, at most what a
/// session could reasonably pin per direction.
/// The largest `egress.max_streams_per_session`. A session's HTTP/2 is
/// told this ceiling (plus a margin) when it starts, so that the policy in
/// force, reloadable, is the limit that answers (`too_many_streams`):
/// HTTP/2's own cap cannot change on an open connection.
pub const MAX_STREAMS_CEILING: usize = 4096;
pub const WINDOW_MIN: u64 = 64 * 1024;
pub const WINDOW_MAX: u64 = 64 * 1024 * 1024;

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 10_000,
            max_streams_per_session: 256,
            max_streams: 0,
            max_streams_per_principal: 0,
            window_bytes: jvpn_proto::channel::ChannelConfig::DEFAULT_WINDOW,
            principal_bytes_per_s: 0,
            principal_burst_bytes: 1 << 20,
            limits: Vec::new(),
            rules: vec![RuleConfig {
                action: Action::Allow,
                principals: vec!["*".into()],
                cidrs: vec!["0.0.0.0/0".into(), "::/0".into()],
                ports: vec!["1-65535".into()],
            }],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub action: Action,
    /// Principal names (a certificate's subject name or a token's name);
    /// `*` matches every principal.
    #[serde(default = "star")]
    pub principals: Vec<String>,
    /// `10.0.0.0/8`, `2001:db8::/32`, or a single address.
    pub cidrs: Vec<String>,
    /// `443`, `8000-8100`; default every port.
    #[serde(default = "all_ports")]
    pub ports: Vec<String>,
}

fn star() -> Vec<String> {
    vec!["*".into()]
}
fn all_ports() -> Vec<String> {
    vec!["1-65535".into()]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// An address block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    fn bits(a: IpAddr) -> (u128, u8) {
        match a {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        }
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        let ((n, width), (x, xw)) = (Self::bits(self.net), Self::bits(a));
        if width != xw {
            return false;
        }
        let shift = u32::from(width - self.len);
        shift >= 128 || (n >> shift) == (x >> shift)
    }

    /// Is all of `self` inside `outer`?
    fn within(&self, outer: &Cidr) -> bool {
        self.len >= outer.len && outer.contains(self.net)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let written = addr
            .parse::<IpAddr>()
            .map_err(|_| format!("{s:?} is not an address"))?;
        let width = if written.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= width)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={width}"))?,
            None => width,
        };
        let net = canonical(written);
        // An IPv4 block written as IPv4-mapped or NAT64 IPv6 is the block
        // of the last 32 bits: the prefix must lie inside them.
        let len = match (written, net) {
            (IpAddr::V6(_), IpAddr::V4(_)) => len.checked_sub(96).ok_or_else(|| {
                format!(
                    "{s:?}: an IPv4-mapped or NAT64 block needs a prefix of /96 or longer \
                     (it stands for the IPv4 block it carries)"
                )
            })?,
            _ => len,
        };
        let c = Cidr { net, len };
        // The address part must be the network itself: a typo such as
        // 10.0.0.1/8 would otherwise open more than the operator read.
        if Cidr::from_parts(net, len) != c {
            return Err(format!("{s:?} has host bits set"));
        }
        Ok(c)
    }
}

impl Cidr {
    fn from_parts(a: IpAddr, len: u8) -> Cidr {
        let (x, width) = Self::bits(a);
        let shift = u32::from(width - len);
        let masked = if shift >= 128 {
            0
        } else {
            (x >> shift) << shift
        };
        let net = if width == 32 {
            IpAddr::V4(Ipv4Addr::from(masked as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(masked))
        };
        Cidr { net, len }
    }
}

#[cfg(test)]
impl Cidr {
    fn to_string_for_test(self) -> String {
        format!("{}/{}", self.net, self.len)
    }
}

/// The one form policy sees: IPv4-mapped IPv6 and the well-known NAT64
/// prefix (`64:ff9b::/96`, RFC 6052) are the IPv4 address they carry.
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let bits = u128::from(v6);
            if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
                return IpAddr::V4(Ipv4Addr::from(bits as u32));
            }
            a
        }
        v4 => v4,
    }
}

/// Why a destination is refused (the metric label of a policy denial).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// A deny rule matched.
    Rule,
    /// No rule matched.
    NoRule,
    /// A protected range no rule named.
    Protected(Protected),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protected {
    Loopback,
    LinkLocal,
    Multicast,
    Unspecified,
    /// Cloud metadata services outside link-local.
    Metadata,
    /// IPv6 prefixes that reach IPv4 through a translator.
    Transition,
    ClusterListener,
}

impl Denial {
    pub const ALL: [Denial; 9] = [
        Denial::Rule,
        Denial::NoRule,
        Denial::Protected(Protected::Loopback),
        Denial::Protected(Protected::LinkLocal),
        Denial::Protected(Protected::Multicast),
        Denial::Protected(Protected::Unspecified),
        Denial::Protected(Protected::Metadata),
        Denial::Protected(Protected::Transition),
        Denial::Protected(Protected::ClusterListener),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Denial::Rule => "rule",
            Denial::NoRule => "no_rule",
            Denial::Protected(Protected::Loopback) => "loopback",
            Denial::Protected(Protected::LinkLocal) => "link_local",
            Denial::Protected(Protected::Multicast) => "multicast",
            Denial::Protected(Protected::Unspecified) => "unspecified",
            Denial::Protected(Protected::Metadata) => "metadata",
            Denial::Protected(Protected::Transition) => "transition",
            Denial::Protected(Protected::ClusterListener) => "cluster_listener",
        }
    }
}

const PROTECTED: &[(&str, Protected)] = &[
    ("127.0.0.0/8", Protected::Loopback),
    ("::1/128", Protected::Loopback),
    ("169.254.0.0/16", Protected::LinkLocal),
    ("fe80::/10", Protected::LinkLocal),
    ("224.0.0.0/4", Protected::Multicast),
    ("ff00::/8", Protected::Multicast),
    ("0.0.0.0/8", Protected::Unspecified),
    ("255.255.255.255/32", Protected::Unspecified),
    ("::/128", Protected::Unspecified),
    // IPv4-compatible IPv6 (deprecated): ::127.0.0.1 must not be a way in.
    ("::/96", Protected::Unspecified),
    // AWS IMDS over IPv6, Google Cloud's metadata server over IPv6,
    // Alibaba Cloud metadata, Azure WireServer.
    ("fd00:ec2::254/128", Protected::Metadata),
    ("fd20:ce::254/128", Protected::Metadata),
    ("100.100.100.200/32", Protected::Metadata),
    ("168.63.129.16/32", Protected::Metadata),
    // 6to4 and local-use NAT64 embed an IPv4 address a rule on IPv4
    // would not see.
    ("2002::/16", Protected::Transition),
    ("64:ff9b:1::/48", Protected::Transition),
];

#[derive(Clone, Debug)]
struct Rule {
    allow: bool,
    any_principal: bool,
    principals: Vec<String>,
    cidrs: Vec<Cidr>,
    ports: Vec<(u16, u16)>,
}

/// The compiled policy.
#[derive(Clone, Debug)]
pub struct EgressPolicy {
    pub max_streams_per_session: usize,
    /// The gateway's (`egress.max_streams`, 0 resolved).
    pub max_streams: usize,
    pub window_bytes: u64,
    /// Every principal's limits but those `[[egress.limits]]` names.
    defaults: Limits,
    by_principal: std::collections::HashMap<String, Limits>,
    rules: Vec<Rule>,
    protected: Vec<(Cidr, Protected)>,
    /// This gateway's own listeners, protected by exact address; one bound
    /// to a wildcard address is protected on every address of the host.
    listeners: Vec<SocketAddr>,
    /// The host's addresses when the policy was compiled (a wildcard
    /// listener answers on all of them).
    host_addrs: Vec<IpAddr>,
}

impl EgressPolicy {
    /// Compiles `[egress]`; every problem names its key. `listeners` are
    /// this gateway's own; `host_addrs` the host's interface addresses.
    pub fn new(
        cfg: &EgressConfig,
        listeners: &[SocketAddr],
        host_addrs: &[IpAddr],
    ) -> Result<Self, Vec<ConfigProblem>> {
        let mut errs = Vec::new();
        let mut rules = Vec::new();
        for (i, r) in cfg.rules.iter().enumerate() {
            let key = |k: &str| format!("egress.rules[{i}].{k}");
            let cidrs: Vec<Cidr> = r
                .cidrs
                .iter()
                .filter_map(|c| {
                    c.parse()
                        .map_err(|e| errs.push(ConfigProblem::new(key("cidrs"), e)))
                        .ok()
                })
                .collect();
            if r.cidrs.is_empty() {
                errs.push(ConfigProblem::new(
                    key("cidrs"),
                    "must name at least one block",
                ));
            }
            let ports: Vec<(u16, u16)> = r
                .ports
                .iter()
                .filter_map(|p| {
                    parse_ports(p)
                        .map_err(|e| errs.push(ConfigProblem::new(key("ports"), e)))
                        .ok()
                })
                .collect();
            if r.ports.is_empty() {
                // A rule with no ports never matches: a deny rule would
                // silently deny nothing.
                errs.push(ConfigProblem::new(
                    key("ports"),
                    "must name at least one port or range (leave the key out for all ports)",
                ));
            }
            if r.principals.is_empty() {
                errs.push(ConfigProblem::new(
                    key("principals"),
                    "must name at least one principal, or \"*\"",
                ));
            }
            rules.push(Rule {
                allow: r.action == Action::Allow,
                any_principal: r.principals.iter().any(|p| p == "*"),
                principals: r.principals.clone(),
                cidrs,
                ports,
            });
        }
        if cfg.connect_timeout_ms == 0 {
            errs.push(ConfigProblem::new(
                "egress.connect_timeout_ms",
                "must be greater than zero",
            ));
        }
        if !(1..=MAX_STREAMS_CEILING).contains(&cfg.max_streams_per_session) {
            errs.push(ConfigProblem::new(
                "egress.max_streams_per_session",
                format!(
                    "{} is outside 1..={MAX_STREAMS_CEILING}",
                    cfg.max_streams_per_session
                ),
            ));
        }
        if !(WINDOW_MIN..=WINDOW_MAX).contains(&cfg.window_bytes) {
            errs.push(ConfigProblem::new(
                "egress.window_bytes",
                format!(
                    "{} is outside {WINDOW_MIN}..={WINDOW_MAX}",
                    cfg.window_bytes
                ),
            ));
        }
        if cfg.principal_bytes_per_s > 0 && cfg.principal_burst_bytes < BURST_MIN {
            errs.push(ConfigProblem::new(
                "egress.principal_burst_bytes",
                format!(
                    "must be at least {BURST_MIN} (one read of a stream) when \
                     principal_bytes_per_s is set"
                ),
            ));
        }
        let defaults = Limits::new(
            cfg.max_streams_per_principal,
            cfg.principal_bytes_per_s,
            cfg.principal_burst_bytes,
            cfg.connect_timeout_ms,
        );
        let by_principal = compile_limits(cfg, &mut errs);
        if !errs.is_empty() {
            return Err(errs);
        }
        let protected = PROTECTED
            .iter()
            .filter_map(|(c, p)| c.parse().ok().map(|c| (c, *p)))
            .collect();
        Ok(Self {
            max_streams_per_session: cfg.max_streams_per_session,
            max_streams: match cfg.max_streams {
                0 => half_the_open_file_limit(),
                n => n,
            },
            window_bytes: cfg.window_bytes,
            defaults,
            by_principal,
            rules,
            protected,
            listeners: listeners
                .iter()
                .map(|a| SocketAddr::new(canonical(a.ip()), a.port()))
                .collect(),
            host_addrs: host_addrs.iter().map(|a| canonical(*a)).collect(),
        })
    }

    /// `principal`'s limits: its `[[egress.limits]]` entry's, else
    /// `[egress]`'s.
    pub fn limits(&self, principal: &str) -> &Limits {
        self.by_principal.get(principal).unwrap_or(&self.defaults)
    }

    /// May `principal` open a stream to `dest` (an address, after any name
    /// was resolved)?
    pub fn check(&self, principal: &str, dest: SocketAddr) -> Result<(), Denial> {
        self.check_with(principal, dest, &[])
    }

    /// [`EgressPolicy::check`], with `cluster` (the other members' and the
    /// routers' listeners, as membership knows them, and this gateway's
    /// own as bound) protected like this gateway's configured ones.
    pub fn check_with(
        &self,
        principal: &str,
        dest: SocketAddr,
        cluster: &[&[SocketAddr]],
    ) -> Result<(), Denial> {
        let ip = canonical(dest.ip());
        let port = dest.port();
        let listener = self.listeners.iter().any(|l| {
            l.port() == port && (l.ip() == ip || (l.ip().is_unspecified() && self.is_local(ip)))
        }) || cluster.iter().copied().flatten().any(|l| {
            // An unspecified address is a listener bound on every address
            // of a host; the only such list entries are this gateway's.
            l.port() == port
                && (canonical(l.ip()) == ip || (l.ip().is_unspecified() && self.is_local(ip)))
        });
        let range = self.protected.iter().find(|(c, _)| c.contains(ip));
        let host_len = if ip.is_ipv4() { 32 } else { 128 };
        // A protected destination counts only the blocks that name it: a
        // block inside its range, and for a cluster listener that very host.
        let names =
            |c: &Cidr| range.is_none_or(|(r, _)| c.within(r)) && (!listener || c.len == host_len);
        for r in &self.rules {
            if !(r.any_principal || r.principals.iter().any(|p| p == principal)) {
                continue;
            }
            if !r.ports.iter().any(|(lo, hi)| (*lo..=*hi).contains(&port)) {
                continue;
            }
            // A deny rule needs no naming: it may only narrow.
            if r.cidrs
                .iter()
                .any(|c| c.contains(ip) && (!r.allow || names(c)))
            {
                return if r.allow { Ok(()) } else { Err(Denial::Rule) };
            }
        }
        if listener {
            return Err(Denial::Protected(Protected::ClusterListener));
        }
        Err(range.map_or(Denial::NoRule, |(_, p)| Denial::Protected(*p)))
    }
}

/// A principal's token bucket holds at least one read of a stream.
const BURST_MIN: u64 = 16 * 1024;

impl Limits {
    /// From the keys as written: 0 streams or 0 bytes/s is no limit.
    fn new(max_streams: usize, bytes_per_s: u64, burst: u64, connect_timeout_ms: u64) -> Self {
        Self {
            max_streams: if max_streams == 0 {
                usize::MAX
            } else {
                max_streams
            },
            rate: (bytes_per_s > 0).then_some((bytes_per_s, burst)),
            connect_timeout: std::time::Duration::from_millis(connect_timeout_ms),
        }
    }
}

/// `[[egress.limits]]` by principal, each entry's gaps filled from
/// `[egress]`; every problem names its key.
fn compile_limits(
    cfg: &EgressConfig,
    errs: &mut Vec<ConfigProblem>,
) -> std::collections::HashMap<String, Limits> {
    let mut out = std::collections::HashMap::new();
    let mut named_in = std::collections::HashMap::new();
    for (i, l) in cfg.limits.iter().enumerate() {
        let key = |k: &str| format!("egress.limits[{i}].{k}");
        let problem = |k: &str, p: String| ConfigProblem::new(key(k), p);
        if l.principals.is_empty() {
            errs.push(problem(
                "principals",
                "must name at least one principal".into(),
            ));
        }
        if l.max_streams.is_none()
            && l.bytes_per_s.is_none()
            && l.burst_bytes.is_none()
            && l.connect_timeout_ms.is_none()
        {
            errs.push(ConfigProblem::new(
                format!("egress.limits[{i}]"),
                "sets none of max_streams, bytes_per_s, burst_bytes, connect_timeout_ms",
            ));
        }
        if l.connect_timeout_ms == Some(0) {
            errs.push(problem(
                "connect_timeout_ms",
                "must be greater than zero".into(),
            ));
        }
        let rate = l.bytes_per_s.unwrap_or(cfg.principal_bytes_per_s);
        let burst = l.burst_bytes.unwrap_or(cfg.principal_burst_bytes);
        // A burst taken from [egress] is [egress]'s problem, said there.
        if rate > 0 && burst < BURST_MIN && (l.burst_bytes.is_some() || l.bytes_per_s.is_some()) {
            errs.push(problem(
                "burst_bytes",
                format!(
                    "{burst} (egress.principal_burst_bytes when unset) must be at least \
                     {BURST_MIN} (one read of a stream) when a byte rate is set"
                ),
            ));
        }
        let limits = Limits::new(
            l.max_streams.unwrap_or(cfg.max_streams_per_principal),
            rate,
            burst,
            l.connect_timeout_ms.unwrap_or(cfg.connect_timeout_ms),
        );
        for p in &l.principals {
            let taken = named_in.insert(p.clone(), i);
            let why = if p == "*" {
                "\"*\" is every principal: set the [egress] keys instead".to_owned()
            } else if p.is_empty() {
                "an empty name is no principal".to_owned()
            } else if let Some(j) = taken {
                if j == i {
                    format!("{p:?} is named twice")
                } else {
                    format!("{p:?} is already named by egress.limits[{j}]")
                }
            } else {
                out.insert(p.clone(), limits.clone());
                continue;
            };
            errs.push(problem("principals", why));
        }
    }
    out
}

impl EgressPolicy {
    /// Does a wildcard listener (0.0.0.0 / ::) answer on `ip`? The
    /// addresses known when the policy was made, else the host's
    /// addresses now: an address added since (a floating IP moved here)
    /// is local too, and so is any `ip` when they cannot be read (fail
    /// closed).
    fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || ip.is_unspecified() || self.host_addrs.contains(&ip) || host_has(ip)
    }
}

/// How long a reading of the host's addresses is trusted.
const HOST_ADDRS_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether `ip` is one of the host's interface addresses, read at most
/// once per [`HOST_ADDRS_FRESH`] (a stream to a wildcard listener's port
/// asks; others never do). Binding a socket would not do: hosts with
/// `ip_nonlocal_bind` (floating IPs) bind any address. A failed read says
/// yes: the stream is refused rather than let in unchecked.
fn host_has(ip: IpAddr) -> bool {
    type Seen = Option<(std::time::Instant, Option<Vec<IpAddr>>)>;
    static SEEN: std::sync::Mutex<Seen> = std::sync::Mutex::new(None);
    let mut seen = SEEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let stale = seen
        .as_ref()
        .is_none_or(|(at, _)| at.elapsed() >= HOST_ADDRS_FRESH);
    if stale {
        *seen = Some((std::time::Instant::now(), read_host_addrs()));
    }
    match seen.as_ref().map(|(_, addrs)| addrs) {
        Some(Some(addrs)) => addrs.contains(&ip),
        _ => true,
    }
}

/// The host's interface addresses (canonical), or `None` if they cannot
/// be read.
pub(crate) fn read_host_addrs() -> Option<Vec<IpAddr>> {
    let list = nix::ifaddrs::getifaddrs().ok()?;
    Some(
        list.filter_map(|i| {
            let a = i.address?;
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .map(canonical)
        .collect(),
    )
}

fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let one = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{s:?}: ports are 1..=65535"))
    };
    match s.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (one(a)?, one(b)?);
            if a > b {
                return Err(format!("{s:?}: range runs backwards"));
            }
            Ok((a, b))
        }
        None => one(s).map(|p| (p, p)),
    }
}

#[cfg(test)]
mod tests;

/// A token bucket in debt form: taking more than is there leaves a debt
/// the taker sleeps off, so a limited stream moves at the rate, smoothly,
/// and concurrent takers share it fairly.
#[derive(Debug)]
pub struct Bucket {
    state: std::sync::Mutex<(f64, std::time::Instant)>,
}

impl Bucket {
    /// A full bucket of `burst` bytes.
    pub fn new(burst: u64) -> Self {
        Self {
            state: std::sync::Mutex::new((burst as f64, std::time::Instant::now())),
        }
    }

    /// Takes `n` bytes at `rate` bytes/s (depth `burst`) and returns how long
    /// the taker must wait before moving them.
    pub fn take(
        &self,
        n: u64,
        rate: u64,
        burst: u64,
        now: std::time::Instant,
    ) -> std::time::Duration {
        let mut g = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = &mut *g;
        let rate = rate.max(1) as f64;
        let refill = now.saturating_duration_since(*last).as_secs_f64() * rate;
        *tokens = (*tokens + refill).min(burst as f64) - n as f64;
        *last = now.max(*last);
        if *tokens >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-*tokens / rate)
        }
    }
}
