//! `flotilla controller` (issue 4, in progress): desired state in JetStream KV, placement, the
//! fleet view and the API the CLI calls. Desired-state writes go through
//! [`crate::bus::store::Store`] (compare-and-set), which agents use too, to watch their
//! assignment.

pub mod ids;
pub mod placement;
