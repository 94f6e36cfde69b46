//! A bounded, process-wide stack of reusable resources (copy buffers, splice pipes): what a
//! connection gives back when it goes idle, the next burst of traffic takes instead of
//! allocating. A `Mutex` is taken once per take or give; never held across I/O.

use std::sync::{Mutex, MutexGuard};

/// At most `max` idle items; items given beyond that are dropped (freed or closed).
#[derive(Debug)]
pub struct Recycler<T> {
    items: Mutex<Vec<T>>,
    max: usize,
}

impl<T> Recycler<T> {
    /// An empty recycler keeping at most `max` items (`const`, for a `static`).
    pub const fn new(max: usize) -> Self {
        Self {
            items: Mutex::new(Vec::new()),
            max,
        }
    }

    /// An idle item, if any.
    pub fn take(&self) -> Option<T> {
        self.lock().pop()
    }

    /// Keeps `item` for reuse, or drops it when `max` are kept already.
    pub fn give(&self, item: T) {
        let mut items = self.lock();
        if items.len() < self.max {
            items.push(item);
        }
    }

    /// How many items are kept now (for metrics and tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A poisoned lock only means another thread panicked mid-push: the Vec is fine.
    fn lock(&self) -> MutexGuard<'_, Vec<T>> {
        self.items.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::Recycler;

    #[test]
    fn keeps_at_most_max_and_hands_them_back() {
        let r = Recycler::new(2);
        for i in 0..3 {
            r.give(i);
        }
        assert_eq!(r.len(), 2);
        assert_eq!(r.take(), Some(1));
        assert_eq!(r.take(), Some(0));
        assert_eq!(r.take(), None);
        assert!(r.is_empty());
    }
}
