//! The client's half of a session, sans-IO: what a client keeps between
//! transports, the `Resume` it builds for a new connection, and how it
//! applies the gateway's answers. The real agent and every simulation drive
//! this one type; none of them computes a proof or rotates a key itself.
//!
//! A connection is seen only through its TLS exporter ([`Exporter`]): the
//! channel binding and the next resume key both come from it.
//!
//! # Calling order
//!
//! 1. [`ClientSession::from_hello_ok`] on the connection that carried the HELLO.
//! 2. For each new connection: [`ClientSession::resume_preamble`] (plaintext,
//!    before TLS), then [`ClientSession::build_resume`] (the counter
//!    advances), then exactly one of [`ClientSession::apply_resume_ok`] or
//!    [`ClientSession::apply_reject`] with the answer to that `Resume`.
//!
//! It lives here rather than in the agent crate because the gateway's engine
//! tests and benchmarks drive it too, and the gateway may not depend on the
//! agent; both halves of the RESUME exchange's cryptography are in this crate.

use std::time::Duration;

use crate::crypto::{
    CHANNEL_BINDING_LABEL, ChannelBinding, RESUME_KEY_LABEL, ResumeKey, resume_key_context,
};
use crate::pb::session::{HelloOk, Policy, Reject, Resume, ResumeOk};
use crate::preamble::Preamble;
use crate::token::TOKEN_LEN;
use crate::{ReasonCode, SessionId};

/// What a client needs of one TLS connection: RFC 8446 §7.5 exporters.
pub trait Exporter {
    /// 32 bytes of keying material for `label` and `context`.
    /// Never all zeros on failure: an error (issue 18 L2).
    fn export(&self, label: &[u8], context: &[u8]) -> Result<[u8; 32], ExportError>;

    /// The connection's channel binding (RFC 9266 label, empty context).
    fn channel_binding(&self) -> Result<ChannelBinding, ExportError> {
        self.export(CHANNEL_BINDING_LABEL, &[])
    }
}

/// The TLS exporter gave no keying material (e.g. the handshake is not
/// complete): nothing may be keyed or proven on that connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the TLS exporter gave no keying material")]
pub struct ExportError;

/// Why an answer from the gateway was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// `HelloOk.session_id` is not 16 bytes.
    #[error("bad session id")]
    SessionId,
    /// The routing token has the wrong length.
    #[error("bad resume token")]
    Token,
    /// The routing token's key id does not fit the preamble's byte.
    #[error("bad token key id")]
    TokenKeyId,
    /// The connection's exporter failed: fail closed, never a zero key.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A `ResumeOk` from another node or incarnation than the one that
    /// issued the session: a silent migration attempt, refused. (Topology
    /// 3's takeover is the one exception: a migratable session, a higher
    /// owner epoch and a valid server proof.)
    #[error("ResumeOk from {got}, session belongs to {expected}")]
    OwnerMismatch { expected: String, got: String },
    /// A new owner (or the same one) named an owner epoch that is not the
    /// one this client holds, or not higher for a takeover: a stale or
    /// replayed claim, refused.
    #[error("ResumeOk with owner epoch {got}, client holds {held}")]
    OwnerEpoch { held: u64, got: u64 },
    /// The gateway could not prove it holds the session key.
    #[error("server proof does not verify")]
    ServerProof,
}

/// What a `Reject` means for the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectAdvice {
    pub reason: ReasonCode,
    /// The gateway's hint; zero when it gave none.
    pub retry_after: Duration,
    /// `stale_binding` named the current epoch and the session adopted it:
    /// build the next `Resume` on the same connection.
    pub retry_here: bool,
    /// The session is gone ([`ends_session`]): a new HELLO, explicitly.
    pub session_gone: bool,
    /// How long the gateway keeps the session without a transport from now,
    /// when it said (it may have moved past the policy's TTL).
    pub deadline: Option<Duration>,
}

/// Does a gateway answer with this reason mean the session is gone, so that
/// only an explicit re-handshake can continue?
pub fn ends_session(reason: ReasonCode) -> bool {
    matches!(
        reason,
        ReasonCode::UnknownSession
            | ReasonCode::OwnerLost
            | ReasonCode::SessionLifetimeExceeded
            | ReasonCode::TransportTtlExceeded
            | ReasonCode::Draining
            | ReasonCode::Superseded
            | ReasonCode::OperatorTerminated
    )
}

/// What an accepted `ResumeOk` did to the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resumed {
    /// Its owner took the new transport.
    Same,
    /// Topology 3: another gateway took the session over from its dead
    /// owner (the store's claim bumped the owner epoch; the proof was made
    /// with the session's key). Whatever lived in the old owner's process
    /// (the channel and its streams) is gone; the session carries on.
    Migrated {
        /// `node/incarnation` of the previous and the new owner.
        from: String,
        to: String,
        owner_epoch: u64,
    },
}

/// The client's state of one session.
#[derive(Clone)]
pub struct ClientSession {
    pub id: SessionId,
    pub node_id: String,
    pub incarnation: u64,
    /// Bumped by every takeover (topology 3); 1 from the HELLO.
    pub owner_epoch: u64,
    /// `HelloOk.migratable`: the session is recorded in a shared store and
    /// may be taken over by another gateway when its owner dies.
    pub migratable: bool,
    /// `HelloOk.via_router`: how the session is reached (`None`: an
    /// older gateway did not say).
    pub via_router: Option<bool>,
    /// `HelloOk.channel_finish`: the gateway delivers what a closed
    /// session's ended streams got (false: an older gateway).
    pub channel_finish: bool,
    pub binding_epoch: u64,
    pub state_version: u64,
    pub policy: Policy,
    key: ResumeKey,
    counter: u64,
    token: [u8; TOKEN_LEN],
    key_id: u8,
}

impl std::fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSession")
            .field("node_id", &self.node_id)
            .field("binding_epoch", &self.binding_epoch)
            .field("counter", &self.counter)
            .finish_non_exhaustive()
    }
}

impl ClientSession {
    /// The session a `HelloOk` created, keyed from the connection it came on.
    pub fn from_hello_ok(ok: HelloOk, conn: &impl Exporter) -> Result<Self, ClientError> {
        let id = SessionId::from_slice(&ok.session_id).map_err(|_| ClientError::SessionId)?;
        let token: [u8; TOKEN_LEN] = ok
            .resume_token
            .as_slice()
            .try_into()
            .map_err(|_| ClientError::Token)?;
        let key_id = u8::try_from(ok.token_key_id).map_err(|_| ClientError::TokenKeyId)?;
        let key = ResumeKey::new(
            conn.export(RESUME_KEY_LABEL, &resume_key_context(&id, ok.binding_epoch))?,
        );
        Ok(Self {
            id,
            node_id: ok.node_id,
            incarnation: ok.incarnation,
            owner_epoch: 1,
            migratable: ok.migratable,
            via_router: ok.via_router,
            channel_finish: ok.channel_finish,
            binding_epoch: ok.binding_epoch,
            state_version: ok.state_version,
            policy: ok.policy.unwrap_or_default(),
            key,
            counter: 0,
            token,
            key_id,
        })
    }

    /// The plaintext preamble of a new connection for this session.
    pub fn resume_preamble(&self) -> Preamble {
        Preamble::Resume {
            key_id: self.key_id,
            token: self.token,
        }
    }

    /// Key id of the routing token the next RESUME will carry.
    pub fn token_key_id(&self) -> u8 {
        self.key_id
    }

    /// The counter of the last `Resume` built.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Test hook: the current resume key (adversarial tests forge with it).
    #[cfg(any(test, feature = "testkit"))]
    pub fn key(&self) -> &ResumeKey {
        &self.key
    }

    /// Test hook: a client that never received its last `ResumeOk` still
    /// holds the previous key.
    #[cfg(any(test, feature = "testkit"))]
    pub fn set_key(&mut self, key: ResumeKey) {
        self.key = key;
    }

    /// Test hook: two copies of one client share its counter.
    #[cfg(any(test, feature = "testkit"))]
    pub fn set_counter(&mut self, counter: u64) {
        self.counter = counter;
    }

    /// The next `Resume`, bound to `conn` (the counter advances, so a
    /// captured one can never be replayed as new).
    pub fn build_resume(&mut self, conn: &impl Exporter) -> Result<Resume, ClientError> {
        let binding = conn.channel_binding()?;
        self.counter += 1;
        let proof = self
            .key
            .resume_proof(&self.id, self.counter, self.binding_epoch, &binding);
        Ok(Resume {
            session_id: self.id.as_bytes().to_vec(),
            counter: self.counter,
            binding_epoch: self.binding_epoch,
            proof: proof.to_vec(),
            // The agent sets these for its channel and its keep-alives.
            received: None,
            keepalive: false,
        })
    }

    /// Applies the `ResumeOk` that answered `sent` on `conn`: the owner must
    /// be the one that issued the session (or, for a migratable session, a
    /// taker with a higher owner epoch) and the server proof must verify;
    /// then the key rotates to this connection and the new token is kept.
    /// On an error nothing changes.
    pub fn apply_resume_ok(
        &mut self,
        sent: &Resume,
        ok: &ResumeOk,
        conn: &impl Exporter,
    ) -> Result<Resumed, ClientError> {
        let same = ok.node_id == self.node_id && ok.incarnation == self.incarnation;
        let held = format!("{}/{:016x}", self.node_id, self.incarnation);
        let offered = format!("{}/{:016x}", ok.node_id, ok.incarnation);
        if !same && !self.migratable {
            return Err(ClientError::OwnerMismatch {
                expected: held,
                got: offered,
            });
        }
        // The owner that keeps a session keeps its epoch (0: a gateway from
        // before owner epochs); a taker must name a higher one.
        let epoch_ok = if same {
            ok.owner_epoch == self.owner_epoch || ok.owner_epoch == 0
        } else {
            ok.owner_epoch > self.owner_epoch
        };
        if !epoch_ok {
            return Err(ClientError::OwnerEpoch {
                held: self.owner_epoch,
                got: ok.owner_epoch,
            });
        }
        let binding = conn.channel_binding()?;
        if !self.key.verify_server_proof(
            &self.id,
            sent.counter,
            ok.binding_epoch,
            &binding,
            &ok.server_proof,
        ) {
            return Err(ClientError::ServerProof);
        }
        let next_key = ResumeKey::new(conn.export(
            RESUME_KEY_LABEL,
            &resume_key_context(&self.id, ok.binding_epoch),
        )?);
        let resumed = if same {
            Resumed::Same
        } else {
            self.node_id.clone_from(&ok.node_id);
            self.incarnation = ok.incarnation;
            self.owner_epoch = ok.owner_epoch;
            Resumed::Migrated {
                from: held,
                to: offered,
                owner_epoch: ok.owner_epoch,
            }
        };
        self.binding_epoch = ok.binding_epoch;
        self.state_version = ok.state_version;
        self.key = next_key;
        // A malformed token leaves the previous one, which still routes.
        if let (Ok(tok), Ok(id)) = (
            <[u8; TOKEN_LEN]>::try_from(ok.resume_token.as_slice()),
            u8::try_from(ok.token_key_id),
        ) {
            self.token = tok;
            self.key_id = id;
        }
        Ok(resumed)
    }

    /// Applies a `Reject` of a `Resume`: `stale_binding` with the current
    /// epoch is adopted (retry on the same connection); anything else is
    /// the caller's to act on, with the hint.
    pub fn apply_reject(&mut self, r: &Reject) -> RejectAdvice {
        let reason = ReasonCode::try_from(r.reason).unwrap_or(ReasonCode::ProtocolError);
        let retry_here = reason == ReasonCode::StaleBinding && r.current_binding_epoch > 0;
        if retry_here {
            self.binding_epoch = r.current_binding_epoch;
        }
        RejectAdvice {
            reason,
            retry_after: Duration::from_millis(r.retry_after_ms),
            retry_here,
            session_gone: ends_session(reason),
            deadline: (r.transport_lost_deadline_ms > 0)
                .then(|| Duration::from_millis(r.transport_lost_deadline_ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::SimConn;

    fn hello_ok(conn: &SimConn) -> (HelloOk, ResumeKey) {
        let id = SessionId::from_bytes([9; 16]);
        let ok = HelloOk {
            keepalive_ms: 0,
            session_id: id.as_bytes().to_vec(),
            node_id: "g1".into(),
            incarnation: 7,
            state_version: 1,
            binding_epoch: 1,
            resume_token: vec![3; TOKEN_LEN],
            policy: None,
            token_key_id: 2,
            channel_window: 0,
            migratable: false,
            via_router: None,
            channel_finish: false,
        };
        let key = conn.resume_key(&resume_key_context(&id, 1));
        (ok, key)
    }

    /// The gateway's side, as the engine computes it.
    fn resume_ok(key: &ResumeKey, r: &Resume, conn: &SimConn, epoch: u64) -> ResumeOk {
        let id = SessionId::from_slice(&r.session_id).unwrap();
        ResumeOk {
            keepalive_ms: 0,
            node_id: "g1".into(),
            incarnation: 7,
            owner_epoch: 1,
            state_version: 2,
            binding_epoch: epoch,
            resume_token: vec![4; TOKEN_LEN],
            server_proof: key
                .server_proof(&id, r.counter, epoch, &conn.binding())
                .to_vec(),
            token_key_id: 3,
            received: None,
            channel_window: 0,
        }
    }

    #[test]
    fn a_resume_carries_a_fresh_counter_and_a_proof_the_gateway_verifies() {
        let c0 = SimConn(1);
        let (ok, key) = hello_ok(&c0);
        let mut s = ClientSession::from_hello_ok(ok, &c0).unwrap();
        let c1 = SimConn(2);
        let r1 = s.build_resume(&c1).unwrap();
        let r2 = s.build_resume(&c1).unwrap();
        assert_eq!((r1.counter, r2.counter), (1, 2));
        let proof: [u8; 32] = r1.proof.as_slice().try_into().unwrap();
        assert!(key.verify_resume_proof(&s.id, 1, 1, &c1.binding(), &proof));
        // Bound to its connection: the same proof does not verify on another.
        assert!(!key.verify_resume_proof(&s.id, 1, 1, &c0.binding(), &proof));
    }

    #[test]
    fn resume_ok_rotates_the_key_and_takes_the_new_token() {
        let c0 = SimConn(1);
        let (ok, key) = hello_ok(&c0);
        let mut s = ClientSession::from_hello_ok(ok, &c0).unwrap();
        assert_eq!(s.token_key_id(), 2);
        let c1 = SimConn(2);
        let r = s.build_resume(&c1).unwrap();
        s.apply_resume_ok(&r, &resume_ok(&key, &r, &c1, 2), &c1)
            .unwrap();
        assert_eq!(
            (s.binding_epoch, s.state_version, s.token_key_id()),
            (2, 2, 3)
        );
        // The next proof is under the key exported from c1.
        let next = c1.resume_key(&resume_key_context(&s.id, 2));
        let c2 = SimConn(3);
        let r = s.build_resume(&c2).unwrap();
        let proof: [u8; 32] = r.proof.as_slice().try_into().unwrap();
        assert!(next.verify_resume_proof(&s.id, 2, 2, &c2.binding(), &proof));
    }

    #[test]
    fn another_owner_or_a_wrong_proof_is_refused_and_changes_nothing() {
        let c0 = SimConn(1);
        let (ok, key) = hello_ok(&c0);
        let mut s = ClientSession::from_hello_ok(ok, &c0).unwrap();
        let c1 = SimConn(2);
        let r = s.build_resume(&c1).unwrap();
        let mut other = resume_ok(&key, &r, &c1, 2);
        other.incarnation = 8;
        assert!(matches!(
            s.apply_resume_ok(&r, &other, &c1),
            Err(ClientError::OwnerMismatch { .. })
        ));
        // A proof computed for another connection (a relay) does not verify.
        let relayed = resume_ok(&key, &r, &SimConn(99), 2);
        assert_eq!(
            s.apply_resume_ok(&r, &relayed, &c1),
            Err(ClientError::ServerProof)
        );
        assert_eq!((s.binding_epoch, s.token_key_id()), (1, 2));
    }

    /// Topology 3: a taker is accepted only for a migratable session, only
    /// with a higher owner epoch and a proof under the session's key; the
    /// client then follows the new owner (and keeps its epoch from then on).
    #[test]
    fn a_takeover_needs_a_migratable_session_a_higher_epoch_and_the_proof() {
        let c0 = SimConn(1);
        let (mut ok, key) = hello_ok(&c0);
        ok.migratable = true;
        let mut s = ClientSession::from_hello_ok(ok, &c0).unwrap();
        let c1 = SimConn(2);
        let r = s.build_resume(&c1).unwrap();
        let taker = |owner_epoch: u64, k: &ResumeKey, on: &SimConn| ResumeOk {
            node_id: "g2".into(),
            incarnation: 9,
            owner_epoch,
            ..resume_ok(k, &r, on, 2)
        };
        let before = (s.node_id.clone(), s.owner_epoch, s.binding_epoch);
        // Not higher: refused.
        assert_eq!(
            s.apply_resume_ok(&r, &taker(1, &key, &c1), &c1),
            Err(ClientError::OwnerEpoch { held: 1, got: 1 })
        );
        // Higher, but proven with another key (a taker that never read the
        // session's record): refused.
        let forged = ResumeKey::new([5; 32]);
        assert_eq!(
            s.apply_resume_ok(&r, &taker(2, &forged, &c1), &c1),
            Err(ClientError::ServerProof)
        );
        // Higher and proven for another connection: refused.
        assert_eq!(
            s.apply_resume_ok(&r, &taker(2, &key, &SimConn(99)), &c1),
            Err(ClientError::ServerProof)
        );
        assert_eq!(before, (s.node_id.clone(), s.owner_epoch, s.binding_epoch));
        assert_eq!(
            s.apply_resume_ok(&r, &taker(2, &key, &c1), &c1),
            Ok(Resumed::Migrated {
                from: format!("g1/{:016x}", 7),
                to: format!("g2/{:016x}", 9),
                owner_epoch: 2,
            })
        );
        assert_eq!(
            (
                s.node_id.as_str(),
                s.incarnation,
                s.owner_epoch,
                s.binding_epoch
            ),
            ("g2", 9, 2, 2)
        );
        // The new owner keeps the session at its epoch: a plain resume; the
        // old owner (epoch 1) coming back is refused.
        let next = c1.resume_key(&resume_key_context(&s.id, 2));
        let c2 = SimConn(3);
        let r = s.build_resume(&c2).unwrap();
        let mut back = resume_ok(&next, &r, &c2, 3);
        assert_eq!(
            s.apply_resume_ok(&r, &back, &c2),
            Err(ClientError::OwnerEpoch { held: 2, got: 1 })
        );
        back.node_id = "g2".into();
        back.incarnation = 9;
        back.owner_epoch = 2;
        assert_eq!(s.apply_resume_ok(&r, &back, &c2), Ok(Resumed::Same));
    }

    #[test]
    fn stale_binding_adopts_the_named_epoch_other_rejects_do_not() {
        let c0 = SimConn(1);
        let (ok, _) = hello_ok(&c0);
        let mut s = ClientSession::from_hello_ok(ok, &c0).unwrap();
        let advice = s.apply_reject(&Reject {
            reason: ReasonCode::StaleBinding as i32,
            retry_after_ms: 0,
            current_binding_epoch: 5,
            ..Reject::default()
        });
        assert!(advice.retry_here);
        assert_eq!(s.binding_epoch, 5);
        let advice = s.apply_reject(&Reject {
            reason: ReasonCode::Overloaded as i32,
            retry_after_ms: 250,
            current_binding_epoch: 9,
            transport_lost_deadline_ms: 40_000,
        });
        assert!(!advice.retry_here && !advice.session_gone);
        assert_eq!(advice.deadline, Some(Duration::from_secs(40)));
        assert_eq!(advice.retry_after, Duration::from_millis(250));
        assert_eq!(s.binding_epoch, 5);
        let advice = s.apply_reject(&Reject {
            reason: ReasonCode::UnknownSession as i32,
            retry_after_ms: 0,
            current_binding_epoch: 0,
            ..Reject::default()
        });
        assert!(advice.session_gone && !advice.retry_here);
        assert_eq!(advice.deadline, None, "0 means not said");
    }

    /// Issue 18 L2: an exporter failure is an error at every step, never an
    /// all-zero key or binding, and changes nothing.
    #[test]
    fn a_failing_exporter_fails_closed() {
        use crate::testkit::BrokenConn;
        let c0 = SimConn(1);
        let (ok, key) = hello_ok(&c0);
        assert_eq!(
            ClientSession::from_hello_ok(ok.clone(), &BrokenConn).unwrap_err(),
            ClientError::Export(ExportError)
        );
        let mut s = ClientSession::from_hello_ok(ok, &c0).unwrap();
        let before = (s.counter, s.binding_epoch);
        assert_eq!(
            s.build_resume(&BrokenConn).unwrap_err(),
            ClientError::Export(ExportError)
        );
        assert_eq!((s.counter, s.binding_epoch), before, "no counter spent");
        let c1 = SimConn(2);
        let r = s.build_resume(&c1).unwrap();
        let answer = resume_ok(&key, &r, &c1, 2);
        assert_eq!(
            s.apply_resume_ok(&r, &answer, &BrokenConn).unwrap_err(),
            ClientError::Export(ExportError)
        );
        assert_eq!(s.binding_epoch, 1, "nothing changed");
        s.apply_resume_ok(&r, &answer, &c1).unwrap();
        assert_eq!(s.binding_epoch, 2);
    }

    /// `Reject` as gateways and agents before `transport_lost_deadline_ms`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RejectBefore {
        #[prost(int32, tag = "1")]
        reason: i32,
        #[prost(uint64, tag = "2")]
        retry_after_ms: u64,
        #[prost(uint64, tag = "3")]
        current_binding_epoch: u64,
    }

    #[test]
    fn the_deadline_field_is_invisible_to_older_peers_and_absent_from_theirs() {
        use prost::Message;
        let new = Reject {
            reason: ReasonCode::SwitchRateLimited as i32,
            retry_after_ms: 45_000,
            current_binding_epoch: 4,
            transport_lost_deadline_ms: 47_000,
        };
        let old = RejectBefore::decode(new.encode_to_vec().as_slice()).unwrap();
        assert_eq!((old.reason, old.retry_after_ms), (new.reason, 45_000));
        assert_eq!(old.current_binding_epoch, 4);
        let from_old = Reject::decode(old.encode_to_vec().as_slice()).unwrap();
        assert_eq!(from_old.transport_lost_deadline_ms, 0);
        let c0 = SimConn(1);
        let (ok, _) = hello_ok(&c0);
        let mut s = ClientSession::from_hello_ok(ok, &c0).unwrap();
        assert_eq!(s.apply_reject(&from_old).deadline, None);
    }

    /// The data plane's fields (protocol.md §16) are additive: a peer one
    /// version older decodes today's frames and loses only them, and its
    /// frames decode here as "no channel".
    #[test]
    fn the_channel_fields_are_invisible_to_older_peers_and_absent_from_theirs() {
        use crate::pb::session::Hello;
        use prost::Message;

        #[derive(Clone, PartialEq, prost::Message)]
        struct HelloBefore {
            #[prost(uint32, tag = "1")]
            protocol_version: u32,
            #[prost(bytes = "vec", tag = "2")]
            auth: Vec<u8>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct ResumeBefore {
            #[prost(bytes = "vec", tag = "1")]
            session_id: Vec<u8>,
            #[prost(uint64, tag = "2")]
            counter: u64,
            #[prost(uint64, tag = "3")]
            binding_epoch: u64,
            #[prost(bytes = "vec", tag = "4")]
            proof: Vec<u8>,
        }
        let hello = Hello {
            keepalive: false,
            protocol_version: 1,
            auth: b"token-of-sixteen".to_vec(),
            channel: true,
            migration: true,
        };
        let old = HelloBefore::decode(hello.encode_to_vec().as_slice()).unwrap();
        assert_eq!(old.auth, hello.auth);
        assert!(
            !Hello::decode(old.encode_to_vec().as_slice())
                .unwrap()
                .channel
        );

        let c0 = SimConn(1);
        let (ok, _) = hello_ok(&c0);
        let mut s = ClientSession::from_hello_ok(ok.clone(), &c0).unwrap();
        let mut r = s.build_resume(&SimConn(2)).unwrap();
        r.received = Some(1 << 40);
        let old = ResumeBefore::decode(r.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            (old.counter, old.proof.as_slice()),
            (r.counter, r.proof.as_slice())
        );
        let from_old = Resume::decode(old.encode_to_vec().as_slice()).unwrap();
        assert_eq!(from_old.received, None, "absent, not zero");
        // An explicit zero survives as Some(0): "received nothing" differs
        // from "speaks no channel".
        r.received = Some(0);
        assert_eq!(
            Resume::decode(r.encode_to_vec().as_slice())
                .unwrap()
                .received,
            Some(0)
        );

        let mut hok = ok;
        hok.channel_window = 1 << 20;
        assert_eq!(
            HelloOk::decode(hok.encode_to_vec().as_slice())
                .unwrap()
                .channel_window,
            1 << 20
        );
    }

    #[test]
    fn a_malformed_hello_ok_is_a_typed_error() {
        let c0 = SimConn(1);
        let (mut ok, _) = hello_ok(&c0);
        ok.session_id.pop();
        assert_eq!(
            ClientSession::from_hello_ok(ok, &c0).unwrap_err(),
            ClientError::SessionId
        );
        let (mut ok, _) = hello_ok(&c0);
        ok.resume_token.pop();
        assert_eq!(
            ClientSession::from_hello_ok(ok, &c0).unwrap_err(),
            ClientError::Token
        );
    }
}
