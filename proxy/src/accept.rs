//! What every listener of the proxy does the same way: accept with a back-off on errors
//! (EMFILE must not spin the loop), refuse over the connection limit, and run each
//! connection in a tracked task with its span and its access-log guard, closed with
//! reason `shutdown` when the drain time is over.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::access_log::{ConnLog, Direction};
use crate::shared::Shared;

/// The work of one connection, recording what happens into its log.
pub type ConnFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The next connection with a free slot, or `None` once `stop` fires.
pub async fn next(
    listener: &TcpListener,
    direction: Direction,
    slots: &Arc<Semaphore>,
    shared: &Shared,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return None,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(listener = ?listener.local_addr().ok(), error = %e, direction = direction.as_str(), "accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(permit) => return Some((stream, peer, permit)),
            Err(_) => {
                shared.metrics.refuse(direction.as_str(), "limit");
                tracing::warn!(%peer, limit = shared.config.limits.max_connections, direction = direction.as_str(), "connection limit reached; closing");
            }
        }
    }
}

/// Runs `work` for one accepted connection in a tracked task, in a span with its id,
/// with the access-log guard it fills in.
pub fn spawn<W>(
    shared: &Arc<Shared>,
    direction: Direction,
    peer: SocketAddr,
    local: SocketAddr,
    permit: OwnedSemaphorePermit,
    work: W,
) where
    W: for<'a> FnOnce(&'a mut ConnLog) -> ConnFuture<'a> + Send + 'static,
{
    let id = shared.next_id();
    let span = tracing::info_span!("conn", direction = direction.as_str(), conn = id, src = %peer);
    let s = shared.clone();
    shared.tracker.spawn(
        async move {
            let _permit = permit;
            let mut log = ConnLog::new(id, direction, peer, local, s.metrics.clone());
            tokio::select! {
                _ = work(&mut log) => {}
                _ = s.force_close.cancelled() => log.reason = "shutdown",
            }
        }
        .instrument(span),
    );
}
