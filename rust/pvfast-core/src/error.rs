//! Failures that are *not* UV return codes: caller misuse and host errors. UV errors are
//! `UvcStatus` values and never become `CoreError`.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoreError {
    /// An argument has a value the API does not accept (Python: ValueError).
    InvalidArgument { arg: &'static str, msg: String },
    /// An index is outside its sequence (Python: IndexError).
    IndexOutOfRange {
        arg: &'static str,
        index: u64,
        len: u64,
    },
    /// No such live configuration (Python: KeyError).
    NoSuchConfig(u64),
    /// The region was released; every access fails (Python: ValueError).
    RegionReleased(u64),
    /// The region belongs to another Ultravisor (Python: ValueError).
    ForeignRegion(u64),
    /// The host (or a guest) touched a page it may not access (Python: SecureStorageAccess).
    SecureStorageAccess {
        offset: u64,
        state: &'static str,
        owner: u64,
    },
    /// An OS call failed with this errno (Python: OSError).
    Os(i32),
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CoreError::InvalidArgument { arg, msg } => write!(f, "{arg}: {msg}"),
            CoreError::IndexOutOfRange { arg, index, len } => {
                write!(f, "{arg}: index {index} out of range (0..{len})")
            }
            CoreError::NoSuchConfig(h) => write!(f, "handle: no configuration {h:#x}"),
            CoreError::RegionReleased(id) => write!(f, "region: region {id} has been released"),
            CoreError::ForeignRegion(id) => {
                write!(f, "region: region {id} belongs to another Ultravisor")
            }
            CoreError::SecureStorageAccess {
                offset,
                state,
                owner,
            } => {
                write!(
                    f,
                    "secure storage access at offset {offset:#x} (page {state}, owner {owner:#x})"
                )
            }
            CoreError::Os(errno) => write!(f, "{}", std::io::Error::from_raw_os_error(*errno)),
        }
    }
}

impl std::error::Error for CoreError {}

pub(crate) fn invalid(arg: &'static str, msg: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument {
        arg,
        msg: msg.into(),
    }
}
