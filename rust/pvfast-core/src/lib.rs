//! pvfast-core: an emulated IBM Z Ultravisor. Guest storage regions with per-page secure
//! states, secure configurations and CPUs, every UVC the KVM teardown paths issue, and the
//! parallel destroy walk that asynchronous teardown spends its time in. Pure Rust, no Python.
//!
//! Modules, lowest first; each imports only modules listed before it (and the constants below):
//! `error`, `uvc`, `account`, `memory`, `zero`, `image` (leaves) → `config` → `state` (the shared `Core`)
//! → `region`, `pages` → `walk` → `ultravisor` (one method per UVC) → `kernel` (range helpers)
//! → `dispatch` (raw UVCBs).

pub mod account;
mod config;
pub mod dispatch;
pub mod error;
pub mod image;
pub mod kernel;
pub mod memory;
mod pages;
pub mod region;
mod state;
pub mod ultravisor;
pub mod uvc;
pub mod walk;
pub mod zero;

pub use account::{Account, AccountSnapshot, Binding, CostTable, ModelMutex};
pub use error::CoreError;
pub use kernel::{AccessResult, ImportResult, TeardownResult, UnpackResult, UnpackStatus};
pub use memory::MemoryMode;
pub use region::{PageState, Region, StateCounts};
pub use ultravisor::{TableSizes, Ultravisor, UvInfo, UvOptions};
pub use uvc::{rc, Uvc, UvcStatus};
pub use walk::{CancelToken, WalkResult};

/// Host and guest page size (also the unit of SE image components).
pub const PAGE_SIZE: usize = 4096;

/// Present pages per batch of an interruptible walk (the kernel's GATHER_GET_PAGES).
pub const BATCH_PAGES: usize = 32;

/// One MiB: the granule of guest storage lengths and of the dump UVCs.
pub(crate) const MIB: u64 = 1 << 20;
