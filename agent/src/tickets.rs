//! Where the agent keeps the TLS resumption tickets its gateway sent
//! (issue 17, design notes 45 and 51): per server name the two newest (a
//! gateway sends two per connection), the newest offered first, each at
//! most once, and only by RESUME connections. The second is for the retry
//! of a RESUME refused before TLS, whose ClientHello took the first. A HELLO always runs a full
//! handshake (the session's principal comes from it) but keeps the ticket
//! it receives, so the first reattach already resumes.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use rustls::NamedGroup;
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls_pki_types::ServerName;

#[derive(Debug, Default)]
struct Slots {
    kx: HashMap<ServerName<'static>, NamedGroup>,
    tickets: HashMap<ServerName<'static>, VecDeque<Tls13ClientSessionValue>>,
}

/// Tickets kept per server name.
const KEPT: usize = 2;

/// The store of one agent; [`TicketStore::for_hello`] and
/// [`TicketStore::for_resume`] are its two views.
#[derive(Clone, Debug, Default)]
pub struct TicketStore {
    slots: Arc<Mutex<Slots>>,
    offer: bool,
}

impl TicketStore {
    /// Keeps tickets, never offers one.
    pub fn for_hello(&self) -> Arc<Self> {
        Arc::new(Self {
            slots: self.slots.clone(),
            offer: false,
        })
    }

    /// Keeps tickets and offers each once.
    pub fn for_resume(&self) -> Arc<Self> {
        Arc::new(Self {
            slots: self.slots.clone(),
            offer: true,
        })
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientSessionStore for TicketStore {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.slots().kx.insert(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.slots().kx.get(server_name).copied()
    }

    // TLS 1.3 only: nothing of TLS 1.2 is ever kept.
    fn set_tls12_session(&self, _: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _: &ServerName<'static>) {}

    /// The newest are kept: a gateway sends fresh ones with every
    /// connection, and older ones are either used or the first to go stale.
    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let mut slots = self.slots();
        let kept = slots.tickets.entry(server_name).or_default();
        kept.push_back(value);
        while kept.len() > KEPT {
            kept.pop_front();
        }
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        if !self.offer {
            return None;
        }
        self.slots()
            .tickets
            .get_mut(server_name)
            .and_then(VecDeque::pop_back)
    }
}
