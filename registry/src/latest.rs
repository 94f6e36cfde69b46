//! The one way a hot path reads published state: [`Latest`] keeps an `Arc` of the newest
//! value a `watch` channel holds and replaces it only when the channel's version says a
//! newer one exists. Checking is an atomic version compare; no lock is held while the
//! value is used, so a DNS query or a new connection never waits on the writer.

use std::sync::Arc;

use tokio::sync::watch;

/// A cached reader of a `watch::Receiver<Arc<T>>` (one per task; clone it for another).
#[derive(Debug, Clone)]
pub struct Latest<T> {
    rx: watch::Receiver<Arc<T>>,
    cached: Arc<T>,
}

impl<T> Latest<T> {
    /// A reader over `rx`, starting from its current value.
    pub fn new(mut rx: watch::Receiver<Arc<T>>) -> Self {
        let cached = rx.borrow_and_update().clone();
        Self { rx, cached }
    }

    /// The newest value published (the cached one when nothing newer exists, or when the
    /// writer is gone: the last value stays valid).
    pub fn current(&mut self) -> &Arc<T> {
        if self.rx.has_changed().unwrap_or(false) {
            self.cached = self.rx.borrow_and_update().clone();
        }
        &self.cached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_writer_and_keeps_the_last_value_after_it_is_gone() {
        let (tx, rx) = watch::channel(Arc::new(1));
        let mut r = Latest::new(rx);
        assert_eq!(**r.current(), 1);
        tx.send_replace(Arc::new(2));
        assert_eq!(**r.current(), 2);
        drop(tx);
        assert_eq!(**r.current(), 2);
    }
}
