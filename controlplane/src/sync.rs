//! Locking that survives a panicked holder: every lock in the agent guards plain data that stays
//! consistent between statements (counters, maps, a connection), so a poisoned lock is taken as
//! it is rather than spreading the panic to every later caller.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, recovering it if a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
