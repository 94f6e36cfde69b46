//! What `/ready` reports: the agent is ready when every part it runs is up (the CA is
//! loaded, the registry was translated into a first snapshot, each listener is bound), and
//! stops being ready when shutdown begins. A probe sees which part is missing.

use std::sync::Mutex;

/// The parts a process waits for before it is ready; each is named in `/ready`'s answer.
#[derive(Debug, Default)]
pub struct Readiness {
    /// Parts still pending, by name, in the order they were declared.
    pending: Mutex<Vec<&'static str>>,
    /// Set once shutdown begins.
    stopping: std::sync::atomic::AtomicBool,
}

impl Readiness {
    /// A readiness that waits for `parts`.
    pub fn waiting_for(parts: &[&'static str]) -> Self {
        Self {
            pending: Mutex::new(parts.to_vec()),
            stopping: Default::default(),
        }
    }

    /// Marks `part` as up.
    pub fn up(&self, part: &'static str) {
        if let Ok(mut p) = self.pending.lock() {
            p.retain(|x| *x != part);
        }
    }

    /// Marks the process as shutting down: it is no longer ready.
    pub fn stopping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// `Ok(())` when ready, else what is missing (for the 503 body).
    pub fn check(&self) -> Result<(), String> {
        if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("shutting down".to_owned());
        }
        match self.pending.lock() {
            Ok(p) if p.is_empty() => Ok(()),
            Ok(p) => Err(format!("waiting for: {}", p.join(", "))),
            Err(_) => Err("readiness state poisoned".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_part_is_up_and_not_while_stopping() {
        let r = Readiness::waiting_for(&["ca", "xds listener"]);
        assert_eq!(r.check(), Err("waiting for: ca, xds listener".to_owned()));
        r.up("ca");
        assert_eq!(r.check(), Err("waiting for: xds listener".to_owned()));
        r.up("xds listener");
        assert_eq!(r.check(), Ok(()));
        r.stopping();
        assert_eq!(r.check(), Err("shutting down".to_owned()));
    }
}
