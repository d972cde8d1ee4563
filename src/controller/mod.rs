//! `flotilla controller` (issue 4, in progress): desired state in JetStream KV, placement, the
//! fleet view and the API the CLI calls. So far: the compare-and-set store every desired-state
//! write goes through.

pub mod store;
