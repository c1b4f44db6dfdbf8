//! The cluster seam: what the scheduler extender and the admission webhook decide. The allocation
//! ledger over published readings and bound pods ([`ledger`]), fit and score ([`placement`]), and
//! which pods the webhook sends to vramslice-scheduler ([`admission`]).

pub mod admission;
pub mod ledger;
pub mod placement;
