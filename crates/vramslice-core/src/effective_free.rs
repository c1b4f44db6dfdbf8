//! The one rule for how much of a GPU's memory new work may be promised, in both modes.
//!
//! - Device-plugin mode: the extender filters and scores by [`effective_free`], from the node's
//!   published reading and the pods it knows ([`crate::cluster::ledger`] gathers the inputs).
//! - DRA mode: kube-scheduler subtracts the claims it allocated from the `memory` capacity a
//!   device publishes, so the plugin publishes [`claimable_capacity`]: effective free plus what
//!   the claims on the GPU were granted, rounded down to the request step. The scheduler's own
//!   arithmetic then arrives at the same effective free.
//!
//! The inputs, per GPU:
//! - `advertised`: what the GPU offers (units × unit bytes; in DRA mode the same, counted in steps);
//! - `granted`: what pods or claims on it were promised;
//! - `live_free`: free memory as last measured;
//! - `unobserved`: what those grants may still allocate that the measurement cannot show, i.e. for
//!   each grant `granted − min(used, granted)` (its whole grant when its use is not yet measured).
//!   A process of no grant, or a grant's use past what it was granted, is already missing from
//!   `live_free`, so it lowers the result;
//! - `headroom`: a safety margin kept free.
//!
//! Everything saturates at zero; nothing here can overflow or panic.

/// What a GPU's measurement leaves for new grants: `live_free − unobserved − headroom`.
pub fn live_room(live_free: u64, unobserved: u64, headroom: u64) -> u64 {
    live_free
        .saturating_sub(unobserved)
        .saturating_sub(headroom)
}

/// `min(advertised − granted, live_free − unobserved − headroom)`: the most a new grant on
/// this GPU may be, by declaration and by measurement together.
pub fn effective_free(
    advertised: u64,
    granted: u64,
    live_free: u64,
    unobserved: u64,
    headroom: u64,
) -> u64 {
    advertised
        .saturating_sub(granted)
        .min(live_room(live_free, unobserved, headroom))
}

/// What grant `granted` with measured use `used` may still allocate unseen:
/// `granted − min(used, granted)`, the whole grant when nothing is measured yet.
pub fn unobserved_part(granted: u64, used: Option<u64>) -> u64 {
    granted.saturating_sub(used.unwrap_or(0))
}

/// The `memory` capacity a DRA device publishes: [`effective_free`] plus what its claims were
/// granted (the scheduler takes those off again), rounded down to `step`, never above
/// `advertised`. A `step` of zero is treated as one byte.
pub fn claimable_capacity(
    advertised: u64,
    granted: u64,
    live_free: u64,
    unobserved: u64,
    headroom: u64,
    step: u64,
) -> u64 {
    let room = effective_free(advertised, granted, live_free, unobserved, headroom)
        .saturating_add(granted)
        .min(advertised);
    let step = step.max(1);
    room - room % step
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn declared_limits_when_the_measurement_has_room() {
        // 80 GiB GPU, 60 granted, 70 live free (grants use 10 of their 60): 20 left by declaration.
        assert_eq!(
            effective_free(80 * GIB, 60 * GIB, 70 * GIB, 50 * GIB, 0),
            20 * GIB
        );
    }

    #[test]
    fn an_outside_process_lowers_the_measured_part() {
        // Same GPU, but a process of no grant holds 16 GiB: live free 54, unobserved 50.
        assert_eq!(
            effective_free(80 * GIB, 60 * GIB, 54 * GIB, 50 * GIB, GIB / 2),
            3 * GIB + GIB / 2
        );
    }

    #[test]
    fn a_claim_past_its_grant_lowers_the_published_capacity() {
        // One claim of 20 GiB uses 26: live free 54 of 80, nothing unobserved.
        let capacity = claimable_capacity(80 * GIB, 20 * GIB, 54 * GIB, 0, 0, GIB);
        assert_eq!(capacity, 74 * GIB);
        // The scheduler's arithmetic: capacity − granted = effective free.
        assert_eq!(
            capacity - 20 * GIB,
            effective_free(80 * GIB, 20 * GIB, 54 * GIB, 0, 0)
        );
    }

    #[test]
    fn capacity_rounds_down_to_the_step_and_never_exceeds_the_gpu() {
        assert_eq!(
            claimable_capacity(80 * GIB, 0, 79 * GIB + 5, 0, 0, GIB),
            79 * GIB
        );
        assert_eq!(
            claimable_capacity(80 * GIB, 0, 90 * GIB, 0, 0, GIB),
            80 * GIB
        );
        assert_eq!(claimable_capacity(10, 0, 7, 0, 0, 0), 7);
    }

    #[test]
    fn unobserved_part_is_what_a_grant_may_still_take() {
        assert_eq!(unobserved_part(8 * GIB, None), 8 * GIB);
        assert_eq!(unobserved_part(8 * GIB, Some(3 * GIB)), 5 * GIB);
        assert_eq!(unobserved_part(8 * GIB, Some(9 * GIB)), 0);
    }

    proptest! {
        #[test]
        fn effective_free_is_bounded_by_both_parts(
            advertised in 0u64..1 << 40, granted in 0u64..1 << 40, live in 0u64..1 << 40,
            unobserved in 0u64..1 << 40, headroom in 0u64..1 << 32,
        ) {
            let free = effective_free(advertised, granted, live, unobserved, headroom);
            prop_assert!(free <= advertised.saturating_sub(granted));
            prop_assert!(free <= live);
            prop_assert!(free == advertised.saturating_sub(granted) || free == live_room(live, unobserved, headroom));
        }

        #[test]
        fn the_scheduler_arrives_at_effective_free_from_the_published_capacity(
            advertised_steps in 1u64..160, granted_steps in 0u64..160, live in 0u64..1 << 38,
            unobserved in 0u64..1 << 38, headroom in 0u64..1 << 30,
        ) {
            let step = GIB / 2;
            let advertised = advertised_steps * step;
            let granted = granted_steps.min(advertised_steps) * step;
            let capacity = claimable_capacity(advertised, granted, live, unobserved, headroom, step);
            prop_assert_eq!(capacity % step, 0);
            prop_assert!(capacity <= advertised);
            prop_assert!(capacity >= granted);
            let free = effective_free(advertised, granted, live, unobserved, headroom);
            // What the scheduler may still hand out is the effective free, rounded down to a step.
            prop_assert_eq!(capacity - granted, free - free % step);
        }
    }
}
