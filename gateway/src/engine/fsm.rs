//! The session state machine of DESIGN §3 as one pure function.
//!
//! [`transition`] is the whole table: every (state, event) pair it does not
//! list is `invalid_transition` and changes nothing. The engine calls it for
//! every change, so the table below is the only place transitions are defined.

use jvpn_proto::ReasonCode;

/// Session states. RECOVERING exists only inside one engine call (a RESUME
/// being decided); BIRTH only inside the HELLO (or takeover) call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum State {
    Birth,
    Attached,
    Volatile,
    Degraded,
    Recovering,
    Terminated,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Birth,
        State::Attached,
        State::Volatile,
        State::Degraded,
        State::Recovering,
        State::Terminated,
    ];

    /// lower_snake name for metrics labels and events.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Birth => "birth",
            State::Attached => "attached",
            State::Volatile => "volatile",
            State::Degraded => "degraded",
            State::Recovering => "recovering",
            State::Terminated => "terminated",
        }
    }

    /// Index for per-state arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// A live state: the session exists and may still recover.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            State::Attached | State::Volatile | State::Degraded | State::Recovering
        )
    }
}

/// Why an authenticated, fresh RESUME did not bind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Denial {
    StaleBinding,
    SwitchRateLimited,
    CooldownActive,
}

impl Denial {
    pub const ALL: [Denial; 3] = [
        Denial::StaleBinding,
        Denial::SwitchRateLimited,
        Denial::CooldownActive,
    ];

    pub fn reason(self) -> ReasonCode {
        match self {
            Denial::StaleBinding => ReasonCode::StaleBinding,
            Denial::SwitchRateLimited => ReasonCode::SwitchRateLimited,
            Denial::CooldownActive => ReasonCode::CooldownActive,
        }
    }
}

/// Explicit terminations requested from outside the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Termination {
    Operator,
    Drain,
    Superseded,
    /// The agent ended its own session (`Terminate` frame).
    AgentClosed,
    /// The router lease lapsed between minting and `HelloOk` (fencing).
    LeaseLost,
    /// The agent broke the session channel's rules (a `Data` out of its
    /// window, an `Ack` or resume offset out of range): its streams cannot
    /// be trusted to be byte-exact any more.
    ChannelBroken,
    /// Topology 3: the owner lease this session was recorded under is lost
    /// (its deadline passed, or etcd ended it), or the store refused the
    /// session's binding change: a taker may own it now.
    StoreUnavailable,
}

impl Termination {
    pub const ALL: [Termination; 7] = [
        Termination::Operator,
        Termination::Drain,
        Termination::Superseded,
        Termination::AgentClosed,
        Termination::LeaseLost,
        Termination::ChannelBroken,
        Termination::StoreUnavailable,
    ];

    pub fn reason(self) -> ReasonCode {
        match self {
            Termination::Operator => ReasonCode::OperatorTerminated,
            Termination::Drain => ReasonCode::Draining,
            Termination::Superseded => ReasonCode::Superseded,
            Termination::AgentClosed => ReasonCode::AgentClosed,
            Termination::LeaseLost => ReasonCode::NotInCluster,
            Termination::ChannelBroken => ReasonCode::ProtocolError,
            Termination::StoreUnavailable => ReasonCode::StoreUnavailable,
        }
    }
}

/// Everything that can happen to a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Event {
    HandshakeDone,
    /// Topology 3: this gateway claimed the session from its dead owner in
    /// the shared store (the claim is the handshake of this incarnation).
    TakenOver,
    TransportClosed,
    HeartbeatTimeout,
    /// A RESUME passed proof and replay checks.
    ResumeAuthenticated,
    /// Same engine call: epoch current and anti-flap allows.
    SwitchAllowed,
    /// Same engine call: the switch was refused.
    SwitchDenied(Denial),
    VolatileTimeout,
    TransportTtlExpired,
    LifetimeExpired,
    Terminate(Termination),
}

impl Event {
    /// Every event, for exhaustive table tests.
    pub fn all() -> Vec<Event> {
        let mut v = vec![
            Event::HandshakeDone,
            Event::TakenOver,
            Event::TransportClosed,
            Event::HeartbeatTimeout,
            Event::ResumeAuthenticated,
            Event::SwitchAllowed,
            Event::VolatileTimeout,
            Event::TransportTtlExpired,
            Event::LifetimeExpired,
        ];
        v.extend(Denial::ALL.map(Event::SwitchDenied));
        v.extend(Termination::ALL.map(Event::Terminate));
        v
    }
}

/// The transition table. `Err(invalid_transition)` for every unlisted pair.
pub fn transition(from: State, event: Event) -> Result<(State, ReasonCode), ReasonCode> {
    use Event as E;
    use State as S;
    let to = match (from, event) {
        (S::Birth, E::HandshakeDone) => (S::Attached, ReasonCode::HandshakeOk),
        (S::Birth, E::TakenOver) => (S::Attached, ReasonCode::TakenOver),
        (S::Attached, E::TransportClosed) => (S::Volatile, ReasonCode::TransportDead),
        (S::Attached, E::HeartbeatTimeout) => (S::Volatile, ReasonCode::HeartbeatTimeout),
        (S::Attached | S::Volatile | S::Degraded, E::ResumeAuthenticated) => {
            (S::Recovering, ReasonCode::SwitchInitiated)
        }
        (S::Recovering, E::SwitchAllowed) => (S::Attached, ReasonCode::ReattachSuccess),
        (S::Recovering, E::SwitchDenied(d)) => (S::Degraded, d.reason()),
        (S::Volatile, E::VolatileTimeout) => (S::Degraded, ReasonCode::VolatilePersisted),
        // Only states without a transport can run out of transport TTL.
        (S::Volatile | S::Degraded | S::Recovering, E::TransportTtlExpired) => {
            (S::Terminated, ReasonCode::TransportTtlExceeded)
        }
        (s, E::LifetimeExpired) if s.is_live() => {
            (S::Terminated, ReasonCode::SessionLifetimeExceeded)
        }
        (s, E::Terminate(t)) if s.is_live() => (S::Terminated, t.reason()),
        _ => return Err(ReasonCode::InvalidTransition),
    };
    Ok(to)
}
