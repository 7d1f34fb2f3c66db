//! Named results of the native calls: one small frozen class per result shape (UVC status,
//! status + handle, status + dump data, walk, import, ...), with read-only fields, `__repr__`,
//! `__eq__` and `__hash__`. Callers read fields by name; there is no positional unpacking.

use pyo3::prelude::*;
use std::hash::{Hash, Hasher};

use pyo3::IntoPyObjectExt;

use pvfast_core as core_;

/// How a field shows in `__repr__`: rc-like u16 in hex, data as its length.
trait FieldRepr {
    fn field_repr(&self) -> String;
}

impl FieldRepr for u8 {
    fn field_repr(&self) -> String {
        self.to_string()
    }
}

impl FieldRepr for u16 {
    fn field_repr(&self) -> String {
        format!("{self:#06x}")
    }
}

impl FieldRepr for u64 {
    fn field_repr(&self) -> String {
        self.to_string()
    }
}

impl FieldRepr for bool {
    fn field_repr(&self) -> String {
        if *self { "True" } else { "False" }.to_string()
    }
}

impl FieldRepr for String {
    fn field_repr(&self) -> String {
        format!("{self:?}")
    }
}

impl FieldRepr for Vec<u8> {
    fn field_repr(&self) -> String {
        format!("<{} bytes>", self.len())
    }
}

impl FieldRepr for Vec<u64> {
    fn field_repr(&self) -> String {
        format!(
            "<{} counters, {} in all>",
            self.len(),
            self.iter().sum::<u64>()
        )
    }
}

impl FieldRepr for Vec<Vec<u8>> {
    fn field_repr(&self) -> String {
        let items: Vec<String> = self.iter().map(FieldRepr::field_repr).collect();
        format!("[{}]", items.join(", "))
    }
}

/// One result class: the struct, its getters and constructor, and the methods every result
/// has. Fields are listed in the order the constructor takes them.
macro_rules! result_class {
    ($(#[$doc:meta])* $name:ident { $($field:ident: $ty:ty),+ $(,)? }) => {
        $(#[$doc])*
        #[pyclass(frozen, module = "pvfast._native")]
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        pub struct $name {
            $(pub $field: $ty,)+
        }

        #[pymethods]
        impl $name {
            #[new]
            // One argument per field, in field order: the constructor mirrors the class.
            #[allow(clippy::too_many_arguments)]
            fn new($($field: $ty),+) -> Self {
                $name { $($field),+ }
            }

            $(
                #[getter]
                fn $field(&self) -> $ty {
                    self.$field.clone()
                }
            )+

            fn __repr__(&self) -> String {
                let fields: Vec<String> = vec![
                    $(format!("{}={}", stringify!($field), self.$field.field_repr())),+
                ];
                format!("{}({})", stringify!($name), fields.join(", "))
            }

            /// Equal to a result of the same class with equal fields.
            fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
                if let Ok(other) = other.cast::<$name>() {
                    return (self == other.get()).into_py_any(py);
                }
                Ok(py.NotImplemented())
            }

            /// A hash of the fields, so that equal results hash equal.
            fn __hash__(&self) -> isize {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                self.hash(&mut hasher);
                // Python hashes are isize; the bit pattern of the u64 is as good a hash.
                hasher.finish() as isize
            }
        }
    };
}

result_class! {
    /// A single UVC: condition code (0 success, 1 error) and the UV's return codes.
    UvcResult { cc: u8, rc: u16, rrc: u16 }
}

result_class! {
    /// A UVC that creates something (Create Config, Create CPU): status and the new handle
    /// (0 on failure, unless a Create Config rc carries the NEED_DESTROY flag).
    HandleResult { cc: u8, rc: u16, rrc: u16, handle: u64 }
}

result_class! {
    /// A dump UVC: status and the data the UV wrote (empty on failure).
    DumpResult { cc: u8, rc: u16, rrc: u16, data: Vec<u8> }
}

result_class! {
    /// A raw UVCB call: condition code and the block with rc/rrc and output fields filled in.
    CallResult { cc: u8, block: Vec<u8> }
}

result_class! {
    /// A destroy walk: present pages visited (destroy-page UVCs issued), pages made non-secure,
    /// whether it was interrupted, and the first page not known to be done.
    WalkResult { visited: u64, destroyed: u64, interrupted: bool, resume_page: u64 }
}

result_class! {
    /// `import_range`: UVCs issued per kind, imports that failed, rc of the first failure.
    ImportResult { imports: u64, exports: u64, destroys: u64, failed_pages: u64, first_failure_rc: u16 }
}

result_class! {
    /// `make_accessible_range`: successful pins and exports, pages left secure.
    AccessResult { pinned: u64, exported: u64, failed: u64 }
}

result_class! {
    /// `mm_teardown`: pages made non-secure by a destroy, successful exports.
    TeardownResult { destroyed: u64, exported: u64 }
}

result_class! {
    /// `unpack_range`: "ok" | "eagain" | "einval" | "efault", rc/rrc of the last unpack UVC
    /// (0, 0 if none), pages unpacked.
    UnpackResult { status: String, rc: u16, rrc: u16, pages_done: u64 }
}

result_class! {
    /// `Region.page_state`: the page's state name and its owner handle (0 if none).
    PageInfo { state: String, owner: u64 }
}

result_class! {
    /// `Account.snapshot()`: the counters of one account. `uvcs` and `uv_pages` are indexed
    /// like `UVC_NAMES`; times are integers (CPU ns, modelled ps).
    AccountSnapshot {
        uvcs: Vec<u64>, uv_pages: Vec<u64>, ptes: u64, zeroed: u64, faulted: u64, walks: u64,
        tasks: u64, cpu_ns: u64, worker_cpu_ns: u64, work_ps: u64, clock_ps: u64
    }
}

result_class! {
    /// `image_seal`: the SE header and the encrypted components, padded to whole pages.
    SealedImage { header: Vec<u8>, components: Vec<Vec<u8>> }
}

impl From<core_::UvcStatus> for UvcResult {
    fn from(s: core_::UvcStatus) -> Self {
        UvcResult {
            cc: s.cc,
            rc: s.rc,
            rrc: s.rrc,
        }
    }
}

impl From<(core_::UvcStatus, u64)> for HandleResult {
    fn from((s, handle): (core_::UvcStatus, u64)) -> Self {
        HandleResult {
            cc: s.cc,
            rc: s.rc,
            rrc: s.rrc,
            handle,
        }
    }
}

impl From<(core_::UvcStatus, Vec<u8>)> for DumpResult {
    fn from((s, data): (core_::UvcStatus, Vec<u8>)) -> Self {
        DumpResult {
            cc: s.cc,
            rc: s.rc,
            rrc: s.rrc,
            data,
        }
    }
}

impl From<(u8, Vec<u8>)> for CallResult {
    fn from((cc, block): (u8, Vec<u8>)) -> Self {
        CallResult { cc, block }
    }
}

impl From<core_::WalkResult> for WalkResult {
    fn from(w: core_::WalkResult) -> Self {
        WalkResult {
            visited: w.visited,
            destroyed: w.destroyed,
            interrupted: w.interrupted,
            resume_page: w.resume_page,
        }
    }
}

impl From<core_::ImportResult> for ImportResult {
    fn from(x: core_::ImportResult) -> Self {
        ImportResult {
            imports: x.imports,
            exports: x.exports,
            destroys: x.destroys,
            failed_pages: x.failed_pages,
            first_failure_rc: x.first_failure_rc,
        }
    }
}

impl From<core_::AccessResult> for AccessResult {
    fn from(a: core_::AccessResult) -> Self {
        AccessResult {
            pinned: a.pinned,
            exported: a.exported,
            failed: a.failed,
        }
    }
}

impl From<core_::TeardownResult> for TeardownResult {
    fn from(t: core_::TeardownResult) -> Self {
        TeardownResult {
            destroyed: t.destroyed,
            exported: t.exported,
        }
    }
}

impl From<core_::AccountSnapshot> for AccountSnapshot {
    fn from(s: core_::AccountSnapshot) -> Self {
        AccountSnapshot {
            uvcs: s.uvcs.to_vec(),
            uv_pages: s.uv_pages.to_vec(),
            ptes: s.ptes,
            zeroed: s.zeroed,
            faulted: s.faulted,
            walks: s.walks,
            tasks: s.tasks,
            cpu_ns: s.cpu_ns,
            worker_cpu_ns: s.worker_cpu_ns,
            work_ps: s.work_ps,
            clock_ps: s.clock_ps,
        }
    }
}

impl From<core_::UnpackResult> for UnpackResult {
    fn from(u: core_::UnpackResult) -> Self {
        UnpackResult {
            status: u.status.name().to_string(),
            rc: u.rc,
            rrc: u.rrc,
            pages_done: u.pages_done,
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<UvcResult>()?;
    m.add_class::<HandleResult>()?;
    m.add_class::<DumpResult>()?;
    m.add_class::<CallResult>()?;
    m.add_class::<WalkResult>()?;
    m.add_class::<ImportResult>()?;
    m.add_class::<AccessResult>()?;
    m.add_class::<TeardownResult>()?;
    m.add_class::<UnpackResult>()?;
    m.add_class::<PageInfo>()?;
    m.add_class::<SealedImage>()?;
    m.add_class::<AccountSnapshot>()?;
    Ok(())
}
