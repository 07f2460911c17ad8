//! Counting what the programs drop or answer themselves, by reason (`drops` map), and leaving
//! the reason in `skb->cb[0]` for `BPF_PROG_RUN` callers (`sluice trace`).

use aya_ebpf::programs::TcContext;
use sluice_common::{Reason, CB_REASON_MAGIC};

use crate::maps::DROPS;

#[inline(always)]
pub fn record(ctx: &TcContext, reason: Reason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU slot: no other program writes it concurrently.
        unsafe { *counter += 1 };
    }
    // SAFETY: the context is the program's __sk_buff; tc programs may write cb.
    unsafe { (*ctx.skb.skb).cb[0] = CB_REASON_MAGIC | reason };
}

/// Counts an event that is not a drop (`sluice_common::reason_is_count_only`): the packet
/// goes on, `skb->cb` is left alone.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(counter) = DROPS.get_ptr_mut(reason) {
        // SAFETY: as in `record`.
        unsafe { *counter += 1 };
    }
}
