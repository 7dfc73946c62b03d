//! The shared session store of topology 3 (DESIGN.md §9, issue 16): the
//! etcd client with its fenced transactions ([`etcd`]), the self-fence a
//! gateway keeps on its owner lease ([`fence`], sans-IO) and the task that
//! keeps that lease ([`keeper`]).
//!
//! Not yet wired into the session path: the in-memory store stays the only
//! one a gateway serves from (docs/design-notes.md, "The store's etcd
//! client").

pub mod etcd;
pub mod fence;
pub mod keeper;

pub use etcd::{EtcdConfig, EtcdStore, EtcdTls, StoreError, Stored};
pub use fence::{LeaseFence, Renewal};
pub use keeper::{Keeper, KeeperConfig, LeaseStatus, LostBy};
