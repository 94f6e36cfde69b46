//! `--bind-vips`: without capture rules, the proxy binds every federated `VIP:port` named
//! by the `outbound` listener's filter chains itself (127/8 needs no root), following xDS
//! updates: new services get a listener, removed ones lose theirs. A VIP that cannot be
//! bound (the port is taken) is logged and retried on the next update or after a pause.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use xds::client::model::XdsState;

use crate::orig_dst::LocalAddr;
use crate::outbound::{self, ListenerKind};
use crate::shared::Shared;

/// How long to wait before retrying VIPs that could not be bound.
const RETRY: Duration = Duration::from_secs(5);

/// Keeps one listener per VIP until `stop` fires.
pub async fn manage(
    mut xds: watch::Receiver<Arc<XdsState>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut bound: HashMap<SocketAddr, CancellationToken> = HashMap::new();
    loop {
        let wanted = xds.borrow_and_update().vips();
        bound.retain(|addr, token| {
            let keep = wanted.contains(addr);
            if !keep {
                tracing::info!(vip = %addr, "service removed; closing its VIP listener");
                token.cancel();
            }
            keep
        });
        let mut failed = false;
        for addr in wanted {
            if bound.contains_key(&addr) {
                continue;
            }
            match bind(addr) {
                Ok(listener) => {
                    tracing::info!(vip = %addr, "listening on federated VIP");
                    let token = stop.child_token();
                    tokio::spawn(outbound::serve(
                        listener,
                        ListenerKind::Vip,
                        Arc::new(LocalAddr),
                        xds.clone(),
                        shared.clone(),
                        token.clone(),
                    ));
                    bound.insert(addr, token);
                }
                Err(e) => {
                    failed = true;
                    tracing::error!(vip = %addr, error = %e, "cannot bind federated VIP; will retry");
                }
            }
        }
        shared.metrics.vip_listeners.set(bound.len() as i64);
        let retry = async {
            if failed {
                tokio::time::sleep(RETRY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            changed = xds.changed() => if changed.is_err() { break },
            _ = retry => {}
        }
    }
    for token in bound.values() {
        token.cancel();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
