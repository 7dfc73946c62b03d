//! The shared session store of topology 3 (DESIGN.md §9, issue 16): the
//! etcd client with its fenced transactions ([`etcd`]) and the group
//! commit of record writes over it ([`batch`]), the self-fence a
//! gateway keeps on its owner lease ([`fence`], sans-IO), the task that
//! keeps that lease ([`keeper`]) and the one that removes records nobody
//! can use again ([`sweep`]).
//!
//! The session path's side (records at HELLO and RESUME, the fence loop)
//! is `server/stored.rs`; design note 47 says why it is built this way.

pub mod batch;
pub mod etcd;
pub mod fence;
pub mod keeper;
pub mod sweep;

pub use batch::Batcher;
pub use etcd::{EtcdConfig, EtcdStore, EtcdTls, MAX_BATCH, RecordWrite, StoreError, Stored};
pub use fence::{LeaseFence, Renewal};
pub use keeper::{Keeper, KeeperConfig, LeaseStatus, LostBy};
pub use sweep::{Me, Sweeper};

/// Wall-clock milliseconds since the Unix epoch (records carry absolute
/// lifetimes: monotonic clocks are per process).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
