//! The shared session store of topology 3 (DESIGN.md §9, issue 16): the
//! etcd client with its fenced transactions ([`etcd`]) and the self-fence
//! a gateway keeps on its owner lease ([`fence`], sans-IO).
//!
//! Not yet wired into the session path: the in-memory store stays the only
//! one a gateway serves from (docs/design-notes.md, "The store's etcd
//! client").

pub mod etcd;
pub mod fence;

pub use etcd::{EtcdConfig, EtcdStore, EtcdTls, StoreError, Stored};
pub use fence::{LeaseFence, Renewal};
