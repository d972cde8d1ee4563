//! The controller's verbs, one file per family. Each change is written to the desired state
//! first, then carried out by asking the agents concerned (with the exact pm_ids), whose replies
//! make ours. The agents' own convergence to the same state makes either order of arrival safe.

pub(crate) mod reads;
pub(crate) mod scale;
pub(crate) mod start;
pub(crate) mod targeted;
