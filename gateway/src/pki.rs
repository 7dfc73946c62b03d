//! Development PKI: every certificate and secret a local cluster needs, in
//! one directory. Production deployments bring their own CA; the layout and
//! certificate roles stay the same.
//!
//! ```text
//! DIR/client-ca.pem            CA that agents trust for gateway certificates
//! DIR/gateways/<node>.{pem,key}    serverAuth, SANs <cluster>, <node>.node.<cluster>
//! DIR/membership-ca.pem        CA of the membership plane (mTLS)
//! DIR/membership/<node>.{pem,key}  clientAuth, URI SAN jvpn://<cluster>/gateway/<node>
//! DIR/membership/router-<r>.{pem,key}  serverAuth, SANs <r>.router.<cluster>, router.<cluster>
//! DIR/agent-ca.pem             CA whose certificates authenticate agents
//! DIR/agents/agent-<i>.{pem,key}   clientAuth sample agents
//! DIR/cluster.secret           "<key_id>:<64 hex>", the cluster secret
//! DIR/dev-token                a development agent token
//! ```
//!
//! For topology 3, [`mint_etcd`] adds the store's own CA:
//!
//! ```text
//! DIR/etcd/ca.pem              CA of etcd's client and peer ports (mTLS)
//! DIR/etcd/member-<i>.{pem,key}    serverAuth + clientAuth, SANs 127.0.0.1, localhost
//! DIR/etcd/client.{pem,key}    clientAuth, what gateways present to etcd
//! ```
//!
//! Every private key and secret is written with mode 0600.

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

/// What to generate.
#[derive(Clone, Debug)]
pub struct PkiSpec {
    pub out: PathBuf,
    pub cluster: String,
    pub nodes: Vec<String>,
    pub routers: Vec<String>,
    pub agents: usize,
}

/// File names of what [`init`] wrote, for harnesses.
#[derive(Clone, Debug)]
pub struct PkiLayout {
    pub dir: PathBuf,
}

impl PkiLayout {
    pub fn client_ca(&self) -> PathBuf {
        self.dir.join("client-ca.pem")
    }
    pub fn gateway_cert(&self, node: &str) -> PathBuf {
        self.dir.join("gateways").join(format!("{node}.pem"))
    }
    pub fn gateway_key(&self, node: &str) -> PathBuf {
        self.dir.join("gateways").join(format!("{node}.key"))
    }
    pub fn agent_ca(&self) -> PathBuf {
        self.dir.join("agent-ca.pem")
    }
    pub fn agent_cert(&self, i: usize) -> PathBuf {
        self.dir.join("agents").join(format!("agent-{i}.pem"))
    }
    pub fn agent_key(&self, i: usize) -> PathBuf {
        self.dir.join("agents").join(format!("agent-{i}.key"))
    }
    pub fn membership_ca(&self) -> PathBuf {
        self.dir.join("membership-ca.pem")
    }
    /// A gateway's membership client certificate.
    pub fn membership_cert(&self, node: &str) -> PathBuf {
        self.dir.join("membership").join(format!("{node}.pem"))
    }
    pub fn membership_key(&self, node: &str) -> PathBuf {
        self.dir.join("membership").join(format!("{node}.key"))
    }
    /// A router's membership server certificate.
    pub fn router_cert(&self, router: &str) -> PathBuf {
        self.dir
            .join("membership")
            .join(format!("router-{router}.pem"))
    }
    pub fn router_key(&self, router: &str) -> PathBuf {
        self.dir
            .join("membership")
            .join(format!("router-{router}.key"))
    }
    pub fn secret(&self) -> PathBuf {
        self.dir.join("cluster.secret")
    }
    pub fn dev_token(&self) -> PathBuf {
        self.dir.join("dev-token")
    }
}

/// Why the development PKI could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// `cluster.secret` exists: an existing PKI is never overwritten.
    #[error("{0} already holds a PKI (cluster.secret exists)")]
    Exists(String),
    /// The cluster name or a node id is not a valid id.
    #[error("{what}: {error}")]
    Name {
        what: String,
        error: jvpn_proto::ids::IdError,
    },
    /// A name that is not a valid DNS name for a certificate.
    #[error("bad DNS name {0}")]
    DnsName(String),
    /// A certificate or key could not be generated.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A file or directory could not be written.
    #[error("writing {path}: {error}")]
    Write { path: String, error: std::io::Error },
    /// A file of an existing PKI could not be read.
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
}

type Result<T> = std::result::Result<T, PkiError>;

fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |error| PkiError::Write {
        path: path.display().to_string(),
        error,
    }
}

struct Ca {
    params: CertificateParams,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Result<(Self, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let params = ca_params(name);
        let cert = params.self_signed(&key)?;
        Ok((Self { params, key }, cert.pem()))
    }

    fn issue(
        &self,
        cn: &str,
        sans: Vec<SanType>,
        eku: ExtendedKeyUsagePurpose,
    ) -> Result<(String, String)> {
        self.issue_for(cn, sans, vec![eku])
    }

    fn issue_for(
        &self,
        cn: &str,
        sans: Vec<SanType>,
        ekus: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<(String, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = ekus;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

impl Ca {
    /// The CA `init` wrote as `<dir>/<file>.key` under `name`: the same
    /// name and key make the same issuer, so what it signs now verifies
    /// against the CA certificate written then.
    fn load(dir: &Path, file: &str, name: &str) -> Result<Self> {
        let path = dir.join(format!("{file}.key"));
        let pem = fs::read_to_string(&path).map_err(|error| PkiError::Read {
            path: path.display().to_string(),
            error,
        })?;
        let key = KeyPair::from_pem(&pem)?;
        Ok(Self {
            params: ca_params(name),
            key,
        })
    }
}

/// Membership certificates for more node ids under an existing PKI's
/// membership CA (the load tool's member emulator mints its N identities
/// this way). Existing files of those nodes are replaced.
pub fn mint_members(layout: &PkiLayout, cluster: &str, nodes: &[String]) -> Result<()> {
    let ca = Ca::load(
        &layout.dir,
        "membership-ca",
        &format!("jvpn {cluster} membership CA"),
    )?;
    for node in nodes {
        jvpn_proto::NodeId::new(node).map_err(|error| PkiError::Name {
            what: format!("node {node}"),
            error,
        })?;
        issue_membership(&ca, layout, cluster, node)?;
    }
    Ok(())
}

/// Files of the store's PKI ([`mint_etcd`]).
#[derive(Clone, Debug)]
pub struct EtcdPki {
    pub ca: PathBuf,
    pub members: Vec<(PathBuf, PathBuf)>,
    pub client: (PathBuf, PathBuf),
}

/// A CA for an etcd cluster of `members` members on loopback, their
/// certificates (etcd uses one certificate as server and as peer client,
/// so both usages) and one client certificate for the gateways, under
/// `<dir>/etcd`. Existing files are replaced.
pub fn mint_etcd(dir: &Path, cluster: &str, members: usize) -> Result<EtcdPki> {
    mint_etcd_for(dir, cluster, members, &[])
}

/// [`mint_etcd`] with member certificates that also name `ips` (members
/// reached at addresses other than loopback, e.g. from a network namespace).
pub fn mint_etcd_for(dir: &Path, cluster: &str, members: usize, ips: &[IpAddr]) -> Result<EtcdPki> {
    let d = dir.join("etcd");
    fs::create_dir_all(&d).map_err(write_error(&d))?;
    let (ca, ca_pem) = Ca::new(&format!("jvpn {cluster} etcd CA"))?;
    let ca_path = d.join("ca.pem");
    write_public(&ca_path, &ca_pem)?;
    let mut out = Vec::with_capacity(members);
    for i in 0..members {
        let (cert, key) = ca.issue_for(
            &format!("etcd-{i}.{cluster}"),
            [loopback(), dns("localhost")?]
                .into_iter()
                .chain(ips.iter().map(|ip| SanType::IpAddress(*ip)))
                .collect(),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )?;
        let (c, k) = (
            d.join(format!("member-{i}.pem")),
            d.join(format!("member-{i}.key")),
        );
        write_public(&c, &cert)?;
        write_secret(&k, &key)?;
        out.push((c, k));
    }
    let (cert, key) = ca.issue(
        &format!("gateways.{cluster}"),
        vec![dns(&format!("gateways.{cluster}"))?],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let (c, k) = (d.join("client.pem"), d.join("client.key"));
    write_public(&c, &cert)?;
    write_secret(&k, &key)?;
    Ok(EtcdPki {
        ca: ca_path,
        members: out,
        client: (c, k),
    })
}

/// A CA's certificate parameters: what `new` signs and `load` rebuilds.
fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// Writes `node`'s membership certificate and key, issued by `ca`.
fn issue_membership(ca: &Ca, layout: &PkiLayout, cluster: &str, node: &str) -> Result<()> {
    let uri = format!("jvpn://{cluster}/gateway/{node}");
    let (cert, key) = ca.issue(
        &uri,
        vec![SanType::URI(uri.as_str().try_into()?), loopback()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    write_public(&layout.membership_cert(node), &cert)?;
    write_secret(&layout.membership_key(node), &key)
}

fn dn(cn: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    d
}

fn dns(name: &str) -> Result<SanType> {
    let n = name
        .try_into()
        .map_err(|_| PkiError::DnsName(name.to_owned()))?;
    Ok(SanType::DnsName(n))
}

fn loopback() -> SanType {
    SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

fn write_public(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(write_error(path))
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(write_error(path))?;
    f.write_all(text.as_bytes()).map_err(write_error(path))
}

/// Generates the whole tree. Refuses to overwrite an existing cluster secret.
pub fn init(spec: &PkiSpec) -> Result<PkiLayout> {
    let layout = PkiLayout {
        dir: spec.out.clone(),
    };
    if layout.secret().exists() {
        return Err(PkiError::Exists(spec.out.display().to_string()));
    }
    for sub in ["gateways", "membership", "agents"] {
        let dir = spec.out.join(sub);
        fs::create_dir_all(&dir).map_err(write_error(&dir))?;
    }
    let c = &spec.cluster;
    jvpn_proto::NodeId::new(c).map_err(|error| PkiError::Name {
        what: "cluster name".into(),
        error,
    })?;

    let (client_ca, pem) = Ca::new(&format!("jvpn {c} client-facing CA"))?;
    write_public(&layout.client_ca(), &pem)?;
    write_secret(
        &spec.out.join("client-ca.key"),
        &client_ca.key.serialize_pem(),
    )?;
    let (member_ca, pem) = Ca::new(&format!("jvpn {c} membership CA"))?;
    write_public(&layout.membership_ca(), &pem)?;
    write_secret(
        &spec.out.join("membership-ca.key"),
        &member_ca.key.serialize_pem(),
    )?;
    let (agent_ca, pem) = Ca::new(&format!("jvpn {c} agent CA"))?;
    write_public(&layout.agent_ca(), &pem)?;
    write_secret(
        &spec.out.join("agent-ca.key"),
        &agent_ca.key.serialize_pem(),
    )?;

    for node in &spec.nodes {
        jvpn_proto::NodeId::new(node).map_err(|error| PkiError::Name {
            what: format!("node {node}"),
            error,
        })?;
        let (cert, key) = client_ca.issue(
            &format!("{node}.node.{c}"),
            vec![dns(c)?, dns(&format!("{node}.node.{c}"))?, loopback()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        write_public(&layout.gateway_cert(node), &cert)?;
        write_secret(&layout.gateway_key(node), &key)?;
        issue_membership(&member_ca, &layout, c, node)?;
    }
    for r in &spec.routers {
        let name = format!("{r}.router.{c}");
        // Every router also answers to `router.<cluster>`, the one name
        // gateways verify, so gateway configs need no per-router names.
        let (cert, key) = member_ca.issue(
            &name,
            vec![dns(&name)?, dns(&format!("router.{c}"))?, loopback()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        write_public(&layout.router_cert(r), &cert)?;
        write_secret(&layout.router_key(r), &key)?;
    }
    for i in 0..spec.agents {
        let (cert, key) = agent_ca.issue(
            &format!("agent-{i}.{c}"),
            vec![dns(&format!("agent-{i}.{c}"))?],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        write_public(&layout.agent_cert(i), &cert)?;
        write_secret(&layout.agent_key(i), &key)?;
    }
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    write_secret(&layout.secret(), &format!("1:{}\n", hex::encode(secret)))?;
    let mut token = [0u8; 16];
    rand::rng().fill_bytes(&mut token);
    write_secret(&layout.dev_token(), &format!("{}\n", hex::encode(token)))?;
    Ok(layout)
}
