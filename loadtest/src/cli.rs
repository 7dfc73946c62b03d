//! The command line of `jvpn-loadtest`, in the library so that tests can
//! check every command the docs show against it (`docs_commands`).

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "jvpn-loadtest",
    version,
    about = "Jumping VPN load tool and demo"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Load a deployment with a scenario; report latencies and invariants.
    Run(RunArgs),
    /// Render a `run --json` report as one self-contained HTML page.
    Report {
        /// The JSON report.
        file: std::path::PathBuf,
        /// The page to write.
        #[arg(long)]
        html: std::path::PathBuf,
    },
    /// Start a local cluster (1 router + 3 gateways), run agents through
    /// jumps, a scale-out, a router restart and a gateway kill; print a summary.
    Demo {
        /// Print the summary as JSON only.
        #[arg(long)]
        json: bool,
        /// Agents (default: 200 in the cluster, 20 single-node).
        #[arg(long)]
        agents: Option<usize>,
        /// The single-node topology (agent → gateway) instead.
        #[arg(long)]
        single_node: bool,
        /// Where the cluster's sessions live: `memory` (each gateway's
        /// own: topology 2) or `etcd` (a shared store, topology 3: the
        /// killed gateway's sessions are taken over; needs Debian's
        /// etcd-server).
        #[arg(long, default_value = "memory", value_parser = ["memory", "etcd"])]
        store: String,
    },
    /// Start a local cluster and keep it up (Ctrl-C stops it): prints its
    /// addresses and writes a Prometheus config for its admin ports.
    Cluster {
        /// Gateway processes (g1, g2, ...).
        #[arg(long, default_value_t = 3)]
        gateways: usize,
        /// Router processes (r1, r2, ...).
        #[arg(long, default_value_t = 2)]
        routers: usize,
        /// Where prometheus.yml, alerts.yml, a copy of the PKI and every
        /// process's config and log go (kept after the cluster stops).
        #[arg(long, default_value = "jvpn-local-cluster")]
        dir: std::path::PathBuf,
    },
    /// Gateway capacity next to bare rustls (server on CPU 0, load on CPU 1).
    BenchGateway {
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 5)]
        duration_s: u64,
        /// Handshakes kept in flight by the load.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Sessions for the memory measurement.
        #[arg(long, default_value_t = 10_000)]
        sessions: usize,
        /// Agents authenticate with client certificates (as in production)
        /// instead of the development token, in the handshake measurements.
        #[arg(long)]
        agent_certs: bool,
    },
    /// Session churn on one gateway (create, resume, terminate): RSS,
    /// descriptors and the session table must return to their baseline.
    Soak {
        /// Cycles (HELLO, transport dropped, RESUME, Terminate) to run.
        #[arg(long, default_value_t = 1_000_000)]
        sessions: u64,
        /// Cycles before the baseline is read (allocator and caches warm).
        #[arg(long, default_value_t = 10_000)]
        warmup: u64,
        /// Cycles run at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Direct vs jvpn-router vs HAProxy in one run, splice buffers, router
    /// memory per idle connection, detection times (needs haproxy).
    BenchRouter {
        /// Seconds per throughput measurement.
        #[arg(long, default_value_t = 5)]
        duration_s: u64,
        /// Connections kept busy at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Each costs 2 descriptors in the router: keep below half its limit.
        #[arg(long, default_value_t = 9_000)]
        idle_connections: usize,
        /// Kill and pause trials timed for the detection figures.
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Router splice variants (`mode:bytes`); the first serves the comparison.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "copy:65536,copy:8192,copy:262144,pipe:65536"
        )]
        splice_variants: Vec<String>,
    },
    /// Topology 3 measured: etcd compare-and-set latency, and the time
    /// sessions take to come back on a taker after their owner's SIGKILL
    /// (a 3-member etcd on loopback, one router, gateways with [store]).
    BenchTakeover {
        /// Sessions through the router (about 1/gateways of them die).
        #[arg(long, default_value_t = 300)]
        sessions: usize,
        /// Gateways with [store]; one of them is killed (at least 2).
        #[arg(long, default_value_t = 3)]
        gateways: usize,
        /// Sequential compare-and-set writes timed.
        #[arg(long, default_value_t = 500)]
        cas_writes: usize,
        /// Seconds of each RESUME-rate run, without and with the store
        /// (0: skip them).
        #[arg(long, default_value_t = 5)]
        resume_seconds: u64,
        /// Clients resuming at once in those runs.
        #[arg(long, default_value_t = 32)]
        resume_concurrency: usize,
    },
    /// Topology 3 under a seeded fault schedule (gateways and etcd
    /// members killed and paused, a gateway cut from etcd in its own
    /// network namespace; as root), then an independent check that owner
    /// epochs only rise and no two gateways accept one (session, epoch).
    ChaosStore {
        /// The first seed; seeds run one after another on one cluster.
        #[arg(long, default_value_t = 1)]
        first_seed: u64,
        /// How many seeds.
        #[arg(long, default_value_t = 50)]
        seeds: u64,
        /// Agents resuming and jumping throughout (one session each).
        #[arg(long, default_value_t = 12)]
        sessions: usize,
        /// Gateways with [store] (at least 2).
        #[arg(long, default_value_t = 3)]
        gateways: usize,
        /// Keep the cluster's configs, logs and event files in this
        /// directory (default: a temporary one, removed).
        #[arg(long)]
        keep: Option<std::path::PathBuf>,
    },
    /// What membership costs a router at N emulated members: router CPU
    /// and RSS, reply bytes, detection times (one run per N).
    BenchMembers {
        /// Member counts, one run each.
        #[arg(long, value_delimiter = ',', default_value = "100,300,1000")]
        members: Vec<usize>,
        /// Router processes every member heartbeats to.
        #[arg(long, default_value_t = 1)]
        routers: usize,
        /// Each member's heartbeat interval (the gateways' default).
        #[arg(long, default_value_t = 250)]
        interval_ms: u64,
        /// The steady window measured at each N.
        #[arg(long, default_value_t = 10)]
        duration_s: u64,
        /// Members never name the view they hold (gateways one version
        /// older): every reply carries the members.
        #[arg(long)]
        old_format: bool,
        /// Members killed (and as many paused) one after another, each
        /// timed until every router declares it dead.
        #[arg(long, default_value_t = 5)]
        detect_trials: usize,
        /// Seconds of churn after the detection trials: a member joins or
        /// leaves every second (0: no churn phase).
        #[arg(long, default_value_t = 0)]
        churn_s: u64,
        /// Routers on CPU 0, the member emulator and the real gateway on
        /// CPU 1 (needs taskset).
        #[arg(long)]
        pin: bool,
    },
    /// The data plane next to `ssh -D` and a direct connection: bulk MiB/s
    /// (1 and 16 streams), CPU per GiB, CONNECT-to-first-byte latency.
    BenchStreams {
        /// Bytes per test (one stream; 16 streams share the same total).
        #[arg(long, default_value_t = 1 << 30)]
        bytes: u64,
        /// CONNECT-to-first-byte samples per path.
        #[arg(long, default_value_t = 200)]
        connects: usize,
        /// Leave `ssh -D` out (no sshd here).
        #[arg(long)]
        no_ssh: bool,
        /// Leave out the paths between network namespaces (direct over
        /// veth, wireguard-go, OpenVPN in TCP mode); they need root.
        #[arg(long)]
        no_vpn: bool,
    },
    /// The bare rustls baseline server used by bench-gateway; with --echo,
    /// the no-op target that measures the load tool's own overhead.
    #[command(hide = true)]
    BareTlsServer {
        /// Address to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Server certificate (PEM).
        #[arg(long)]
        cert: std::path::PathBuf,
        /// Its private key (PEM).
        #[arg(long)]
        key: std::path::PathBuf,
        /// Require client certificates from this CA (PEM).
        #[arg(long)]
        agent_ca: Option<std::path::PathBuf>,
        /// Keep sessions: answer pings, echo data (no session logic).
        #[arg(long)]
        echo: bool,
    },
    /// Run the agent program (same as the `jvpn-agent` binary).
    #[command(disable_help_flag = true)]
    Agent {
        /// Its arguments, as `jvpn-agent` takes them (`--help` among them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Run the gateway program (same as the `jvpn-gateway` binary).
    #[command(disable_help_flag = true)]
    Gateway {
        /// Its arguments, as `jvpn-gateway` takes them (`--help` among them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Run the router program (same as the `jvpn-router` binary).
    #[command(disable_help_flag = true)]
    Router {
        /// Its arguments, as `jvpn-router` takes them (`--help` among them).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Spawn routers (--local-routers) + N gateways locally.
    #[arg(long, conflicts_with = "routers")]
    pub local_cluster: Option<usize>,
    /// Routers of the local cluster (each holds two sockets per session).
    #[arg(long, default_value_t = 1)]
    pub local_routers: usize,
    /// Routers of an existing deployment (with --pki).
    #[arg(long, value_delimiter = ',', requires = "pki")]
    pub routers: Vec<std::net::SocketAddr>,
    /// PKI directory of that deployment (client-ca.pem, dev-token).
    #[arg(long)]
    pub pki: Option<std::path::PathBuf>,
    /// What happens once the sessions arrived (docs/loadtest.md, Scenarios).
    #[arg(long, value_enum, default_value = "steady")]
    pub scenario: crate::scenario::Scenario,
    /// Sessions (agents) to establish.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,
    /// Session arrivals per second (open loop).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// How long the scenario runs after the last arrival.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// `jump`, `bulk`: each session changes transport this often.
    #[arg(long, default_value_t = 5)]
    pub jump_every_s: u64,
    /// Seeds every random choice (arrival offsets, cuts, payloads).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the JSON report here (schema: docs/loadtest.md); `-` for
    /// stdout (the human summary then goes to stderr).
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// NAME<VALUE or NAME>VALUE, repeatable; exit 1 when one fails.
    #[arg(long)]
    pub threshold: Vec<String>,
    /// `loss`: percentage of open connections cut every second.
    #[arg(long, default_value_t = 20.0)]
    pub loss_pct: f64,
    /// `handshake-flood` / `replay-flood`: attempts per second.
    #[arg(long, default_value_t = 200.0)]
    pub flood_rate: f64,
    /// Local clusters: the gateways' keep-alive interval (policy
    /// `heartbeat_interval_ms`; the timeout is 4 ×). Default: the policy's.
    #[arg(long)]
    pub heartbeat_interval_ms: Option<u64>,
    /// One echo per session every this many ms; 0 = no echoes.
    #[arg(long, default_value_t = 1_000)]
    pub echo_interval_ms: u64,
    /// `bulk`: streams per session.
    #[arg(long, default_value_t = 4)]
    pub streams_per_session: usize,
    /// `bulk`: bytes per transfer (sent, echoed back, compared).
    #[arg(long, default_value_t = 1 << 20)]
    pub transfer_bytes: usize,
}
