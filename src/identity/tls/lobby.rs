//! The lobby: connections accepted and not yet through their TLS handshake. Owns who
//! may wait there and who is closed to make room; it may not read or write a byte of
//! any connection (the handshake tasks do), only peek whether one has arrived.
//!
//! Idle connections must not lock real clients out. A connection is *silent* until
//! its first byte (the ClientHello) arrives. The lobby holds at most
//! [`MAX_HANDSHAKES`] connections, and at most [`MAX_SILENT_PER_SOURCE`] silent ones
//! from one address (real clients leave the silent set within a round trip, so the cap
//! does not hurt clients that share an address with a flood), and at most
//! [`MAX_PER_SOURCE`] from one address in all (a byte or two must not buy a place that
//! cannot be taken back). A newcomer is always let in: over a limit, the oldest silent
//! connection (of its address, or of all; for the per-address limit, else the
//! address's oldest) is closed instead. Before one is closed, its socket is peeked: a ClientHello that
//! arrived before its handshake task ran still counts. Only when every place is taken
//! by a connection that has sent its ClientHello is the newcomer refused.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

/// Connections in the lobby at once (silent or in their handshake).
pub const MAX_HANDSHAKES: usize = 256;
/// Silent connections from one address at once.
pub const MAX_SILENT_PER_SOURCE: usize = 64;
/// Connections from one address in the lobby at once, silent or not: one byte must
/// not buy a place that cannot be taken back.
pub const MAX_PER_SOURCE: usize = 128;

struct Member {
    remote: SocketAddr,
    silent: bool,
    /// A duplicate of the connection's socket, to peek whether a byte arrived.
    probe: Option<std::net::TcpStream>,
    /// Closes the connection (its handshake task) when it is evicted.
    close: Option<tokio::task::AbortHandle>,
}

#[derive(Default)]
struct State {
    next: u64,
    /// By arrival: the first silent one is the oldest.
    members: BTreeMap<u64, Member>,
    silent: HashMap<IpAddr, usize>,
    per_source: HashMap<IpAddr, usize>,
}

impl State {
    fn remove(&mut self, id: u64) -> Option<Member> {
        let member = self.members.remove(&id)?;
        if member.silent {
            self.unsilence(member.remote.ip());
        }
        let source = member.remote.ip();
        if let Some(count) = self.per_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&source);
            }
        }
        Some(member)
    }

    /// The oldest member of `source`, silent or not.
    fn oldest_of(&self, source: IpAddr) -> Option<u64> {
        self.members
            .iter()
            .find(|(_, member)| member.remote.ip() == source)
            .map(|(id, _)| *id)
    }

    fn unsilence(&mut self, source: IpAddr) {
        if let Some(count) = self.silent.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                self.silent.remove(&source);
            }
        }
    }

    /// The oldest silent member (of `source`, if given) that still has not sent a
    /// byte; members found to have sent one are silent no more.
    fn oldest_silent(&mut self, source: Option<IpAddr>) -> Option<u64> {
        loop {
            let (id, member) = self.members.iter().find(|(_, member)| {
                member.silent && source.is_none_or(|source| member.remote.ip() == source)
            })?;
            let id = *id;
            if !member.probe.as_ref().is_some_and(has_data) {
                return Some(id);
            }
            let remote = member.remote;
            if let Some(member) = self.members.get_mut(&id) {
                member.silent = false;
            }
            self.unsilence(remote.ip());
        }
    }
}

/// Whether a byte waits on the (non-blocking) socket.
fn has_data(socket: &std::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(socket.peek(&mut byte), Ok(read) if read > 0)
}

/// A connection closed to make room: where it came from.
pub struct Evicted(pub SocketAddr);

/// The lobby; see the module documentation.
#[derive(Clone, Default)]
pub struct Lobby(Arc<Mutex<State>>);

impl Lobby {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.0.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Connections waiting for their handshake now.
    pub fn waiting(&self) -> usize {
        self.state().members.len()
    }

    /// Lets a connection from `remote` in, closing the silent ones it displaces, and
    /// starts its handshake with `start` (given its ticket). `Err` when every place
    /// is taken by a connection that has sent its ClientHello.
    pub(crate) fn enter(
        &self,
        remote: SocketAddr,
        probe: Option<std::net::TcpStream>,
        start: impl FnOnce(Ticket) -> tokio::task::AbortHandle,
    ) -> Result<Vec<Evicted>, ()> {
        let source = remote.ip();
        let mut state = self.state();
        let mut evicted = Vec::new();
        if state.silent.get(&source).copied().unwrap_or(0) >= MAX_SILENT_PER_SOURCE
            && let Some(id) = state.oldest_silent(Some(source))
        {
            evicted.extend(state.remove(id));
        }
        if state.per_source.get(&source).copied().unwrap_or(0) >= MAX_PER_SOURCE {
            // The address's own oldest goes, silent ones first.
            let id = state
                .oldest_silent(Some(source))
                .or_else(|| state.oldest_of(source));
            if let Some(id) = id {
                evicted.extend(state.remove(id));
            }
        }
        if state.members.len() >= MAX_HANDSHAKES {
            match state.oldest_silent(None) {
                Some(id) => evicted.extend(state.remove(id)),
                None => return Err(()),
            }
        }
        let id = state.next;
        state.next += 1;
        state.members.insert(
            id,
            Member {
                remote,
                silent: true,
                probe,
                close: None,
            },
        );
        *state.silent.entry(source).or_default() += 1;
        *state.per_source.entry(source).or_default() += 1;
        drop(state);
        // Started outside the lock: a task dropped at once (the runtime shutting
        // down) drops its ticket, which takes the lock.
        let close = start(Ticket {
            lobby: self.clone(),
            id,
        });
        let mut state = self.state();
        match state.members.get_mut(&id) {
            Some(member) => member.close = Some(close),
            // Closed to make room before its handle was stored.
            None => close.abort(),
        }
        drop(state);
        Ok(evicted
            .into_iter()
            .map(|member| {
                if let Some(close) = member.close {
                    close.abort();
                }
                Evicted(member.remote)
            })
            .collect())
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let state = self.state();
        (state.members.len(), state.silent.values().sum())
    }
}

/// A connection's place in the lobby; it leaves when this is dropped.
pub struct Ticket {
    lobby: Lobby,
    id: u64,
}

impl Ticket {
    /// The connection sent its first byte: it is no longer silent. `false` if it was
    /// already closed to make room.
    pub fn heard(&self) -> bool {
        let mut state = self.lobby.state();
        let source = match state.members.get_mut(&self.id) {
            Some(member) if member.silent => {
                member.silent = false;
                member.remote.ip()
            }
            Some(_) => return true,
            None => return false,
        };
        state.unsilence(source);
        true
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.lobby.state().remove(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn idle() {
        std::future::pending::<()>().await;
    }

    fn enter(lobby: &Lobby, source: &str) -> (Result<usize, ()>, Option<Ticket>) {
        let mut ticket = None;
        let result = lobby
            .enter(
                SocketAddr::new(source.parse().unwrap(), 40000),
                None,
                |given| {
                    ticket = Some(given);
                    tokio::spawn(idle()).abort_handle()
                },
            )
            .map(|evicted| evicted.len());
        (result, ticket)
    }

    #[tokio::test]
    async fn a_flood_from_one_address_displaces_only_its_own_silent_connections() {
        let lobby = Lobby::default();
        let mut flood = Vec::new();
        for _ in 0..MAX_SILENT_PER_SOURCE {
            let (result, ticket) = enter(&lobby, "127.0.0.2");
            assert_eq!(result, Ok(0));
            flood.push(ticket);
        }
        let (_, real) = enter(&lobby, "127.0.0.1");
        // More from the flood: each displaces the flood's own oldest.
        for _ in 0..1000 {
            let (result, ticket) = enter(&lobby, "127.0.0.2");
            assert_eq!(result, Ok(1));
            flood.push(ticket);
        }
        assert!(
            real.as_ref().unwrap().heard(),
            "the real client is still in"
        );
        assert_eq!(
            lobby.counts(),
            (MAX_SILENT_PER_SOURCE + 1, MAX_SILENT_PER_SOURCE)
        );
        drop(flood);
        assert_eq!(lobby.counts(), (1, 0));
        drop(real);
        assert_eq!(lobby.counts(), (0, 0));
    }

    #[tokio::test]
    async fn one_address_cannot_hold_places_by_sending_a_byte() {
        let lobby = Lobby::default();
        let mut held = Vec::new();
        for _ in 0..MAX_PER_SOURCE {
            let (result, ticket) = enter(&lobby, "192.0.2.1");
            assert_eq!(result, Ok(0));
            let ticket = ticket.unwrap();
            assert!(ticket.heard());
            held.push(ticket);
        }
        let (_, other) = enter(&lobby, "192.0.2.2");
        // The address's own oldest makes room, whatever it sent.
        let (result, newest) = enter(&lobby, "192.0.2.1");
        assert_eq!(result, Ok(1));
        assert!(!held[0].heard(), "the address's oldest was closed");
        assert!(other.unwrap().heard(), "another address keeps its place");
        assert!(newest.is_some());
    }

    #[tokio::test]
    async fn a_full_lobby_displaces_the_oldest_silent_and_refuses_only_when_all_have_spoken() {
        let lobby = Lobby::default();
        let mut tickets = Vec::new();
        // Many addresses, each under its own cap.
        for n in 0..MAX_HANDSHAKES {
            let (result, ticket) = enter(&lobby, &format!("10.0.{}.{}", n / 200, n % 200));
            assert_eq!(result, Ok(0));
            tickets.push(ticket.unwrap());
        }
        let (result, newcomer) = enter(&lobby, "10.9.9.9");
        assert_eq!(result, Ok(1), "the oldest silent one made room");
        assert!(!tickets[0].heard(), "the oldest was the one closed");
        tickets.push(newcomer.unwrap());
        for ticket in &tickets {
            ticket.heard();
        }
        let (result, refused) = enter(&lobby, "10.9.9.10");
        assert_eq!(result, Err(()));
        assert!(refused.is_none(), "a refused connection gets no place");
    }
}
