//! One session as the engine holds it, and the read-only view the shell
//! and operators get of it.

use std::sync::Arc;

use jvpn_proto::Mono;
use jvpn_proto::crypto::ResumeKey;

use super::antiflap::AntiFlap;
use super::fsm::State;
use super::io::TransportId;
use super::policy::Policy;
use super::replay::ReplayWindow;

/// One session as the engine holds it. `PartialEq` compares every field
/// (tests use it to prove that rejected requests change nothing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    pub(super) state: State,
    pub(super) version: u64,
    pub(super) epoch: u64,
    /// 1 from the HELLO; a takeover (topology 3) sets the epoch it claimed.
    pub(super) owner_epoch: u64,
    pub(super) transport: Option<TransportId>,
    pub(super) end_of_life: Mono,
    pub(super) last_rx: Mono,
    pub(super) volatile_since: Mono,
    /// Set while there is no transport: the session ends at this time.
    pub(super) lost_deadline: Option<Mono>,
    pub(super) key: ResumeKey,
    /// The key the agent last proved it holds, kept until it uses `key`, so a
    /// lost `ResumeOk` can be recovered.
    pub(super) fallback: Option<ResumeKey>,
    pub(super) replay: ReplayWindow,
    pub(super) flap: AntiFlap,
    pub(super) principal: Arc<str>,
    /// The policy the session was created under (and its agent was told in
    /// `HelloOk`); a reload changes new sessions only.
    pub(super) policy: Arc<Policy>,
    /// The earliest timer entry queued for this session.
    pub(super) scheduled: Option<Mono>,
    /// Refusal events reported in the current minute.
    pub(super) refusals: RefusalBudget,
}

impl Session {
    pub fn state(&self) -> State {
        self.state
    }
    pub fn state_version(&self) -> u64 {
        self.version
    }
    pub fn binding_epoch(&self) -> u64 {
        self.epoch
    }
    pub fn owner_epoch(&self) -> u64 {
        self.owner_epoch
    }
    pub fn transport(&self) -> Option<TransportId> {
        self.transport
    }
    pub fn principal(&self) -> &str {
        &self.principal
    }
    pub fn transport_lost_deadline(&self) -> Option<Mono> {
        self.lost_deadline
    }
    pub fn end_of_life(&self) -> Mono {
        self.end_of_life
    }
    pub fn switches_in_window(&self, now: Mono) -> usize {
        self.flap.switches_in_window(now)
    }
    /// Highest RESUME counter accepted so far.
    pub fn replay_top(&self) -> u64 {
        self.replay.top()
    }
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}

/// How many refusal events a session reported in the current minute. It is
/// bookkeeping of the event log, not session state: two sessions that
/// differ only here compare equal (tests prove refusals change nothing).
#[derive(Clone, Copy, Debug)]
pub(super) struct RefusalBudget {
    pub(super) window_start: Mono,
    pub(super) count: u32,
}

impl PartialEq for RefusalBudget {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for RefusalBudget {}
