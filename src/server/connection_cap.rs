//! How many connections one door (gRPC, HTTP) keeps open at once, and how a connection past that
//! cap is closed: off the accept loop, bounded in time and in number, with a rate-limited warning
//! that names the flag.
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a refused connection may hold a socket while it is closed.
const REFUSAL_TIME: Duration = Duration::from_secs(2);
/// Refused connections being closed at once; past this one is dropped at once (it may be reset).
const MAX_CONCURRENT_REFUSALS: usize = 64;
/// Shortest time between two warnings about refused connections.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// The cap of one door. Clones share the count.
#[derive(Debug, Clone)]
pub struct ConnectionCap {
    door: &'static str,
    flag: &'static str,
    limit: usize,
    slots: Option<Arc<Semaphore>>,
    refusals: Arc<Semaphore>,
    refused: Arc<AtomicU64>,
    started: Instant,
    last_warning_ms: Arc<AtomicU64>,
}

/// Held by an admitted connection until it ends; `None` inside when the door has no cap.
pub type ConnectionSlot = Option<OwnedSemaphorePermit>;

impl ConnectionCap {
    /// `limit` 0 means no cap. `door` and `flag` name the cap in the warning.
    pub fn new(door: &'static str, flag: &'static str, limit: usize) -> Self {
        Self {
            door,
            flag,
            limit,
            slots: (limit > 0).then(|| Arc::new(Semaphore::new(limit))),
            refusals: Arc::new(Semaphore::new(MAX_CONCURRENT_REFUSALS)),
            refused: Arc::new(AtomicU64::new(0)),
            started: Instant::now(),
            last_warning_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A slot for a new connection, or `None` when the cap is reached.
    pub fn admit(&self) -> Option<ConnectionSlot> {
        match &self.slots {
            None => Some(None),
            Some(slots) => Arc::clone(slots).try_acquire_owned().ok().map(Some),
        }
    }

    /// Closes a connection past the cap, off the accept loop and within [`REFUSAL_TIME`]. It
    /// writes `farewell` first (empty: nothing), then reads the client's bytes until it closes, as
    /// closing with unread bytes would reset the connection and could lose what was written.
    pub fn refuse<S>(&self, mut stream: S, farewell: Bytes)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.warn_refused();
        let Ok(permit) = Arc::clone(&self.refusals).try_acquire_owned() else {
            return;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let close = async {
                if !farewell.is_empty() {
                    stream.write_all(&farewell).await?;
                }
                stream.shutdown().await?;
                let mut sink = [0u8; 1024];
                while stream.read(&mut sink).await? > 0 {}
                io::Result::Ok(())
            };
            let _ = tokio::time::timeout(REFUSAL_TIME, close).await;
        });
    }

    /// One warning per [`REFUSAL_LOG_PERIOD`] at most, with the count, so a flood cannot flood
    /// the log too.
    fn warn_refused(&self) {
        let refused = self.refused.fetch_add(1, Ordering::AcqRel) + 1;
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_warning_ms.load(Ordering::Acquire);
        let due = refused == 1 || now.saturating_sub(last) >= REFUSAL_LOG_PERIOD.as_millis() as u64;
        if due
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            tracing::warn!(
                limit = self.limit,
                refused_total = refused,
                "{} connection refused: {} reached",
                self.door,
                self.flag
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_admits_up_to_its_limit_and_frees_slots_on_drop() {
        let cap = ConnectionCap::new("test", "--cap", 2);
        let a = cap.admit().expect("first");
        let b = cap.admit().expect("second");
        assert!(cap.admit().is_none());
        drop(a);
        assert!(cap.admit().is_some());
        drop(b);
        assert!(ConnectionCap::new("test", "--cap", 0).admit().is_some());
    }

    #[tokio::test]
    async fn a_refused_connection_gets_the_farewell_then_the_end() {
        let cap = ConnectionCap::new("test", "--cap", 1);
        let (server, mut client) = tokio::io::duplex(4096);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        cap.refuse(server, Bytes::from_static(b"goodbye"));
        let mut seen = Vec::new();
        // The server side reads what the client sent, and ends once the client closes.
        let mut buf = [0u8; 64];
        loop {
            let n = client.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        assert_eq!(seen, b"goodbye");
        assert_eq!(cap.refused.load(Ordering::Acquire), 1);
    }

    #[tokio::test]
    async fn refusals_past_the_concurrent_bound_are_dropped_at_once() {
        let cap = ConnectionCap::new("test", "--cap", 1);
        // Clients that never close hold their refusal for REFUSAL_TIME.
        let mut clients = Vec::new();
        for _ in 0..MAX_CONCURRENT_REFUSALS {
            let (server, client) = tokio::io::duplex(64);
            cap.refuse(server, Bytes::new());
            clients.push(client);
        }
        tokio::task::yield_now().await;
        assert_eq!(cap.refusals.available_permits(), 0);
        let (server, mut client) = tokio::io::duplex(64);
        cap.refuse(server, Bytes::from_static(b"never sent"));
        let mut buf = [0u8; 16];
        assert_eq!(
            client.read(&mut buf).await.unwrap(),
            0,
            "dropped without a word"
        );
        drop(clients);
    }
}
