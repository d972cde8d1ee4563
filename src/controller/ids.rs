//! Fleet-wide pm_id allocation: one counter in KV, advanced by compare-and-set, so two
//! controllers (or two requests) never hand out the same id.

use crate::bus::store::{Store, StoreError};

/// The KV key of the counter: the next pm_id to hand out.
pub const NEXT_PM_ID: &str = "meta.next_pm_id";

/// Takes `n` consecutive fresh pm_ids.
pub async fn allocate(store: &Store, n: u32) -> Result<Vec<u32>, StoreError> {
    let (next, _) = store
        .update(NEXT_PM_ID, |v: Option<u32>| {
            v.unwrap_or(0)
                .checked_add(n)
                .ok_or_else(|| StoreError::Refused("no pm_id is left in this fleet".into()))
        })
        .await?;
    Ok((next - n..next).collect())
}
