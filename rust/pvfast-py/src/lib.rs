//! pvfast._native: thin PyO3 glue over pvfast-core. Converts arguments to owned Rust values,
//! runs the work with the GIL released, and maps `CoreError` to Python exceptions in one place.
//! No emulation logic lives here.

use std::collections::HashSet;
use std::sync::Arc;

use pvfast_core as core_;
use pvfast_core::CoreError;
use pyo3::exceptions::{
    PyException, PyIndexError, PyKeyError, PyOSError, PyOverflowError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyInt};

mod account;
mod image;
mod results;

use results::{
    AccessResult, CallResult, DumpResult, HandleResult, ImportResult, PageInfo, TeardownResult,
    UnpackResult, UvcResult, WalkResult,
};

pyo3::create_exception!(
    pvfast._native,
    SecureStorageAccess,
    PyException,
    "Raised by Region.read/write when the host touches a SECURE page (a kernel bug in the caller)."
);

/// Wrapper so the one conversion below can exist (both CoreError and PyErr are foreign here).
struct Error(CoreError);

impl From<CoreError> for Error {
    fn from(e: CoreError) -> Self {
        Error(e)
    }
}

impl From<Error> for PyErr {
    fn from(Error(e): Error) -> PyErr {
        let msg = e.to_string();
        match e {
            CoreError::InvalidArgument { .. }
            | CoreError::RegionReleased(_)
            | CoreError::ForeignRegion(_) => PyValueError::new_err(msg),
            CoreError::IndexOutOfRange { .. } => PyIndexError::new_err(msg),
            CoreError::NoSuchConfig(h) => PyKeyError::new_err(h),
            CoreError::SecureStorageAccess { .. } => SecureStorageAccess::new_err(msg),
            CoreError::Os(errno) => PyOSError::new_err((errno, msg)),
        }
    }
}

type R<T> = Result<T, Error>;

// ---------------------------------------------------------------- argument conversion

/// An int argument that must fit u64; errors name the argument.
fn u64_of(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    if obj.is_instance_of::<PyBool>() || !obj.is_instance_of::<PyInt>() {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(PyTypeError::new_err(format!(
            "{name}: expected int, got {ty}"
        )));
    }
    obj.extract::<u64>()
        .map_err(|_| PyOverflowError::new_err(format!("{name}: {obj} is out of range [0, 2**64)")))
}

fn narrow<T: TryFrom<u64>>(name: &str, v: u64, max: &str) -> PyResult<T> {
    T::try_from(v)
        .map_err(|_| PyOverflowError::new_err(format!("{name}: {v} is out of range [0, {max}]")))
}

macro_rules! u64_args {
    ($($f:ident => $name:literal),* $(,)?) => {$(
        fn $f(obj: &Bound<'_, PyAny>) -> PyResult<u64> { u64_of($name, obj) }
    )*};
}

u64_args! {
    a_handle => "handle", a_gaddr => "gaddr", a_paddr => "paddr", a_cpu_handle => "cpu_handle",
    a_num => "num", a_stor_len => "stor_len", a_guest_len => "guest_len", a_asce => "asce",
    a_sca => "sca", a_base_stor_len => "base_stor_len", a_var_stor_len => "var_stor_len",
    a_tweak0 => "tweak0", a_tweak1 => "tweak1", a_tweak => "tweak", a_addr => "addr",
    a_size => "size", a_start_page => "start_page", a_npages => "npages", a_index => "index",
    a_offset => "offset", a_as_config => "as_config", a_uvc => "uvc", a_rc => "rc", a_rrc => "rrc",
    a_count => "count", a_max_guests => "max_guests", a_max_cpus => "max_cpus", a_threads => "threads",
}

fn a_end_page(obj: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
    if obj.is_none() {
        Ok(None)
    } else {
        u64_of("end_page", obj).map(Some)
    }
}

fn a_opt_guest(obj: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
    if obj.is_none() {
        Ok(None)
    } else {
        u64_of("guest", obj).map(Some)
    }
}

fn a_opt_handle(obj: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
    if obj.is_none() {
        Ok(None)
    } else {
        u64_of("handle", obj).map(Some)
    }
}

// ---------------------------------------------------------------- CancelToken

/// A fatal-signal flag shared between threads. Walks check it once per batch.
#[pyclass(frozen, module = "pvfast._native")]
struct CancelToken {
    inner: core_::CancelToken,
}

#[pymethods]
impl CancelToken {
    #[new]
    fn new() -> Self {
        CancelToken {
            inner: core_::CancelToken::new(),
        }
    }
    fn set(&self) {
        self.inner.set();
    }
    fn clear(&self) {
        self.inner.clear();
    }
    fn is_set(&self) -> bool {
        self.inner.is_set()
    }
}

// ---------------------------------------------------------------- Region

/// Guest storage: an anonymous mapping reserved up front (MAP_NORESERVE), registered with a UV.
#[pyclass(frozen, module = "pvfast._native")]
struct Region {
    inner: Arc<core_::Region>,
}

#[pymethods]
impl Region {
    #[getter]
    fn size(&self) -> u64 {
        self.inner.size()
    }
    #[getter]
    fn pages(&self) -> u64 {
        self.inner.pages()
    }
    #[getter]
    fn base(&self) -> u64 {
        self.inner.base()
    }
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id()
    }

    fn present_pages(&self, py: Python<'_>) -> R<u64> {
        Ok(py.detach(|| self.inner.present_pages())?)
    }

    /// "real" or "state" (see Ultravisor.create_region).
    #[getter]
    fn guest_memory(&self) -> &'static str {
        self.inner.mode().name()
    }

    fn data_pages(&self, py: Python<'_>) -> R<u64> {
        Ok(py.detach(|| self.inner.data_pages())?)
    }

    fn page_state(&self, #[pyo3(from_py_with = a_index)] index: u64) -> R<PageInfo> {
        let (state, owner) = self.inner.page_state(index)?;
        Ok(PageInfo {
            state: state.name().to_string(),
            owner,
        })
    }

    fn state_counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = py.detach(|| self.inner.state_counts()).map_err(Error)?;
        let d = PyDict::new(py);
        d.set_item("nonsecure", c.nonsecure)?;
        d.set_item("secure", c.secure)?;
        d.set_item("shared", c.shared)?;
        d.set_item("exported", c.exported)?;
        d.set_item("orphaned", c.orphaned)?;
        d.set_item("present", c.present)?;
        Ok(d)
    }

    #[pyo3(signature = (offset, size, *, as_config = 0))]
    fn read<'py>(
        &self,
        py: Python<'py>,
        #[pyo3(from_py_with = a_offset)] offset: u64,
        #[pyo3(from_py_with = a_size)] size: u64,
        #[pyo3(from_py_with = a_as_config)] as_config: u64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let data = py
            .detach(|| self.inner.read(offset, size, as_config))
            .map_err(Error)?;
        Ok(PyBytes::new(py, &data))
    }

    #[pyo3(signature = (offset, data, *, as_config = 0))]
    fn write(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_offset)] offset: u64,
        data: Vec<u8>,
        #[pyo3(from_py_with = a_as_config)] as_config: u64,
    ) -> R<()> {
        Ok(py.detach(|| self.inner.write(offset, &data, as_config))?)
    }

    fn touch(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_offset)] offset: u64,
        #[pyo3(from_py_with = a_size)] size: u64,
    ) -> R<u64> {
        Ok(py.detach(|| self.inner.touch(offset, size))?)
    }

    /// Benchmark floor, not emulation: seconds to zero the whole region's memory with
    /// non-temporal stores or memset, on the caller's thread or the UV's pool (GIL released).
    #[pyo3(signature = (nontemporal = true, parallel = true))]
    fn bench_zero(&self, py: Python<'_>, nontemporal: bool, parallel: bool) -> R<f64> {
        Ok(py.detach(|| {
            let t = std::time::Instant::now();
            self.inner
                .bench_zero_all(nontemporal, parallel)
                .map(|()| t.elapsed().as_secs_f64())
        })?)
    }

    fn __repr__(&self) -> String {
        format!(
            "Region(id={}, base={:#x}, size={:#x}{})",
            self.inner.id(),
            self.inner.base(),
            self.inner.size(),
            if self.inner.is_released() {
                ", released"
            } else {
                ""
            }
        )
    }
}

// ---------------------------------------------------------------- Ultravisor

/// One emulated Ultravisor (one per emulated host). Thread-safe; frozen.
#[pyclass(frozen, module = "pvfast._native")]
struct Ultravisor {
    inner: core_::Ultravisor,
}

fn token(c: &Option<PyRef<'_, CancelToken>>) -> Option<core_::CancelToken> {
    c.as_ref().map(|t| t.inner.clone())
}

#[pymethods]
impl Ultravisor {
    #[new]
    #[pyo3(signature = (*, destroy_fast = true, feature_misc = true, feature_aiv = true, dump = true,
        max_guests = 4096, max_cpus = 248, legacy_destroy_rc = false, threads = 0,
        initialised = true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        destroy_fast: bool,
        feature_misc: bool,
        feature_aiv: bool,
        dump: bool,
        #[pyo3(from_py_with = a_max_guests)] max_guests: u64,
        #[pyo3(from_py_with = a_max_cpus)] max_cpus: u64,
        legacy_destroy_rc: bool,
        #[pyo3(from_py_with = a_threads)] threads: u64,
        initialised: bool,
    ) -> PyResult<Self> {
        if max_cpus == 0 || max_cpus > 65536 {
            return Err(PyValueError::new_err(format!(
                "max_cpus: {max_cpus} is not in [1, 65536]"
            )));
        }
        let opts = core_::UvOptions {
            destroy_fast,
            feature_misc,
            feature_aiv,
            dump,
            max_guests: narrow("max_guests", max_guests, "2**32-1")?,
            max_cpus: narrow("max_cpus", max_cpus, "65536")?,
            legacy_destroy_rc,
            threads: narrow("threads", threads.min(1024), "1024")?,
            initialised,
            ..Default::default()
        };
        Ok(Ultravisor {
            inner: core_::Ultravisor::new(opts).map_err(Error)?,
        })
    }

    // ---- inspection
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let i = self.inner.info();
        let d = PyDict::new(py);
        let w = i.inst_calls_list;
        d.set_item("inst_calls_list", (w[0], w[1], w[2], w[3]))?;
        d.set_item("uv_base_stor_len", i.uv_base_stor_len)?;
        d.set_item("uv_feature_indications", i.uv_feature_indications)?;
        d.set_item("guest_base_stor_len", i.guest_base_stor_len)?;
        d.set_item("guest_virt_base_stor_len", i.guest_virt_base_stor_len)?;
        d.set_item("guest_virt_var_stor_len", i.guest_virt_var_stor_len)?;
        d.set_item("guest_cpu_stor_len", i.guest_cpu_stor_len)?;
        d.set_item("max_guest_cpu_id", i.max_guest_cpu_id)?;
        d.set_item("max_num_sec_conf", i.max_num_sec_conf)?;
        d.set_item("max_sec_stor_addr", i.max_sec_stor_addr)?;
        d.set_item("conf_dump_storage_state_len", i.conf_dump_storage_state_len)?;
        d.set_item("conf_dump_finalize_len", i.conf_dump_finalize_len)?;
        Ok(d)
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        for (name, n) in self.inner.stats() {
            d.set_item(name, n)?;
        }
        Ok(d)
    }

    fn reset_stats(&self) {
        self.inner.reset_stats();
    }

    fn config_handles(&self) -> HashSet<u64> {
        self.inner.config_handles().into_iter().collect()
    }

    fn cpu_handles(&self, #[pyo3(from_py_with = a_handle)] handle: u64) -> R<HashSet<u64>> {
        Ok(self.inner.cpu_handles(handle)?.into_iter().collect())
    }

    #[pyo3(signature = (handle = None))]
    fn secure_pages(&self, #[pyo3(from_py_with = a_opt_handle)] handle: Option<u64>) -> u64 {
        self.inner.secure_pages(handle)
    }

    fn donated_bytes(&self) -> u64 {
        self.inner.donated_bytes()
    }

    fn table_sizes<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.table_sizes();
        let d = PyDict::new(py);
        d.set_item("configs", s.configs)?;
        d.set_item("live", s.live)?;
        d.set_item("dead", s.dead)?;
        d.set_item("id_slots", s.id_slots)?;
        d.set_item("free_ids", s.free_ids)?;
        d.set_item("cpus", s.cpus)?;
        d.set_item("asces", s.asces)?;
        Ok(d)
    }

    #[pyo3(signature = (uvc, rc, rrc = 0, count = 1))]
    fn inject_failure(
        &self,
        #[pyo3(from_py_with = a_uvc)] uvc: u64,
        #[pyo3(from_py_with = a_rc)] rc: u64,
        #[pyo3(from_py_with = a_rrc)] rrc: u64,
        #[pyo3(from_py_with = a_count)] count: u64,
    ) -> PyResult<()> {
        let uvc: u16 = narrow("uvc", uvc, "0xffff")?;
        let rc: u16 = narrow("rc", rc, "0xffff")?;
        let rrc: u16 = narrow("rrc", rrc, "0xffff")?;
        self.inner
            .inject_failure(uvc, rc, rrc, count)
            .map_err(|e| Error(e).into())
    }

    fn clear_failures(&self) {
        self.inner.clear_failures();
    }

    #[pyo3(signature = (size, *, guest_memory = "real"))]
    fn create_region(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_size)] size: u64,
        guest_memory: &str,
    ) -> PyResult<Region> {
        let mode = core_::MemoryMode::from_name(guest_memory).ok_or_else(|| {
            PyValueError::new_err(format!(
                "guest_memory: expected 'real' or 'state', got {guest_memory:?}"
            ))
        })?;
        let inner = py
            .detach(|| self.inner.create_region_mode(size, mode))
            .map_err(Error)?;
        Ok(Region { inner })
    }

    // ---- accounting
    /// A new account of this UV, its modelled clock at `start_ps`.
    #[pyo3(signature = (start_ps = 0))]
    fn new_account(&self, start_ps: u64) -> account::Account {
        account::Account {
            inner: self.inner.new_account(start_ps),
        }
    }

    /// The account of UV work that no bound account of this UV claimed.
    fn unattributed(&self) -> account::Account {
        account::Account {
            inner: self.inner.unattributed(),
        }
    }

    /// The cost table (ps per unit) accounts made from now on are charged with.
    #[pyo3(signature = (*, uvc_fixed, uvc_per_page, pte, zero_page, fault_page))]
    fn set_costs(
        &self,
        uvc_fixed: Vec<u64>,
        uvc_per_page: Vec<u64>,
        pte: u64,
        zero_page: u64,
        fault_page: u64,
    ) -> PyResult<()> {
        let n = core_::Uvc::ALL.len();
        let table = |name: &str, v: Vec<u64>| -> PyResult<[u64; core_::uvc::NUM_UVCS]> {
            v.try_into().map_err(|v: Vec<u64>| {
                PyValueError::new_err(format!(
                    "{name}: expected {n} values (one per UVC_NAMES entry), got {}",
                    v.len()
                ))
            })
        };
        self.inner.set_costs(core_::CostTable {
            uvc_fixed: table("uvc_fixed", uvc_fixed)?,
            uvc_per_page: table("uvc_per_page", uvc_per_page)?,
            pte,
            zero_page,
            fault_page,
        });
        Ok(())
    }

    fn release_region(&self, py: Python<'_>, region: PyRef<'_, Region>) -> R<()> {
        let r = Arc::clone(&region.inner);
        Ok(py.detach(|| self.inner.release_region(&r))?)
    }

    // ---- UVCs
    fn query(&self) -> UvcResult {
        self.inner.query().into()
    }

    #[pyo3(signature = (region, *, guest_len, asce, sca, base_stor_len, var_stor_len))]
    #[allow(clippy::too_many_arguments)]
    fn create_config(
        &self,
        region: PyRef<'_, Region>,
        #[pyo3(from_py_with = a_guest_len)] guest_len: u64,
        #[pyo3(from_py_with = a_asce)] asce: u64,
        #[pyo3(from_py_with = a_sca)] sca: u64,
        #[pyo3(from_py_with = a_base_stor_len)] base_stor_len: u64,
        #[pyo3(from_py_with = a_var_stor_len)] var_stor_len: u64,
    ) -> R<HandleResult> {
        let created = self.inner.create_config(
            &region.inner,
            guest_len,
            asce,
            sca,
            base_stor_len,
            var_stor_len,
        )?;
        Ok(created.into())
    }

    fn destroy_config(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_handle)] handle: u64,
    ) -> UvcResult {
        py.detach(|| self.inner.destroy_config(handle)).into()
    }

    fn destroy_config_fast(&self, #[pyo3(from_py_with = a_handle)] handle: u64) -> UvcResult {
        self.inner.destroy_config_fast(handle).into()
    }

    #[pyo3(signature = (handle, *, num, stor_len))]
    fn create_cpu(
        &self,
        #[pyo3(from_py_with = a_handle)] handle: u64,
        #[pyo3(from_py_with = a_num)] num: u64,
        #[pyo3(from_py_with = a_stor_len)] stor_len: u64,
    ) -> HandleResult {
        self.inner.create_cpu(handle, num, stor_len).into()
    }

    fn destroy_cpu(&self, #[pyo3(from_py_with = a_cpu_handle)] cpu_handle: u64) -> UvcResult {
        self.inner.destroy_cpu(cpu_handle).into()
    }

    fn convert_to_secure(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_handle)] handle: u64,
        #[pyo3(from_py_with = a_gaddr)] gaddr: u64,
    ) -> UvcResult {
        py.detach(|| self.inner.convert_to_secure(handle, gaddr))
            .into()
    }

    fn convert_from_secure(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_paddr)] paddr: u64,
    ) -> UvcResult {
        py.detach(|| self.inner.convert_from_secure(paddr)).into()
    }

    fn destroy_page(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_paddr)] paddr: u64,
    ) -> UvcResult {
        py.detach(|| self.inner.destroy_page(paddr)).into()
    }

    fn pin_shared(&self, #[pyo3(from_py_with = a_paddr)] paddr: u64) -> UvcResult {
        self.inner.pin_shared(paddr).into()
    }

    fn unpin_shared(
        &self,
        #[pyo3(from_py_with = a_handle)] handle: u64,
        #[pyo3(from_py_with = a_gaddr)] gaddr: u64,
    ) -> UvcResult {
        self.inner.unpin_shared(handle, gaddr).into()
    }

    fn set_shared_access(
        &self,
        #[pyo3(from_py_with = a_handle)] handle: u64,
        #[pyo3(from_py_with = a_gaddr)] gaddr: u64,
    ) -> UvcResult {
        self.inner.set_shared_access(handle, gaddr).into()
    }

    fn remove_shared_access(
        &self,
        #[pyo3(from_py_with = a_handle)] handle: u64,
        #[pyo3(from_py_with = a_gaddr)] gaddr: u64,
    ) -> UvcResult {
        self.inner.remove_shared_access(handle, gaddr).into()
    }

    fn set_sec_parms(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_handle)] handle: u64,
        header: Vec<u8>,
    ) -> UvcResult {
        py.detach(|| self.inner.set_sec_parms(handle, &header))
            .into()
    }

    fn unpack(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_handle)] handle: u64,
        #[pyo3(from_py_with = a_gaddr)] gaddr: u64,
        #[pyo3(from_py_with = a_tweak0)] tweak0: u64,
        #[pyo3(from_py_with = a_tweak1)] tweak1: u64,
    ) -> UvcResult {
        py.detach(|| self.inner.unpack(handle, gaddr, tweak0, tweak1))
            .into()
    }

    fn verify(&self, py: Python<'_>, #[pyo3(from_py_with = a_handle)] handle: u64) -> UvcResult {
        py.detach(|| self.inner.verify(handle)).into()
    }

    fn prepare_reset(&self, #[pyo3(from_py_with = a_handle)] handle: u64) -> UvcResult {
        self.inner.prepare_reset(handle).into()
    }

    fn unshare_all(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_handle)] handle: u64,
    ) -> UvcResult {
        py.detach(|| self.inner.unshare_all(handle)).into()
    }

    fn dump_init(&self, #[pyo3(from_py_with = a_handle)] handle: u64) -> UvcResult {
        self.inner.dump_init(handle).into()
    }

    fn dump_conf_stor_state(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_handle)] handle: u64,
        #[pyo3(from_py_with = a_gaddr)] gaddr: u64,
    ) -> DumpResult {
        py.detach(|| self.inner.dump_conf_stor_state(handle, gaddr))
            .into()
    }

    fn dump_cpu(&self, #[pyo3(from_py_with = a_cpu_handle)] cpu_handle: u64) -> DumpResult {
        self.inner.dump_cpu(cpu_handle).into()
    }

    fn dump_complete(&self, #[pyo3(from_py_with = a_handle)] handle: u64) -> DumpResult {
        self.inner.dump_complete(handle).into()
    }

    #[pyo3(signature = (uvcb, *, guest = None))]
    fn call(
        &self,
        py: Python<'_>,
        uvcb: Vec<u8>,
        #[pyo3(from_py_with = a_opt_guest)] guest: Option<u64>,
    ) -> CallResult {
        let issuer = guest.map_or(
            core_::dispatch::Issuer::Host,
            core_::dispatch::Issuer::Guest,
        );
        py.detach(|| core_::dispatch::call_as(&self.inner, issuer, &uvcb))
            .into()
    }

    fn is_initialised(&self) -> bool {
        self.inner.is_initialised()
    }

    // ---- kernel-side range helpers
    #[pyo3(signature = (region, start_page = 0, end_page = None, cancel = None, *, export_refused = false))]
    fn destroy_walk(
        &self,
        py: Python<'_>,
        region: PyRef<'_, Region>,
        #[pyo3(from_py_with = a_start_page)] start_page: u64,
        #[pyo3(from_py_with = a_end_page)] end_page: Option<u64>,
        cancel: Option<PyRef<'_, CancelToken>>,
        export_refused: bool,
    ) -> R<WalkResult> {
        let r = Arc::clone(&region.inner);
        let c = token(&cancel);
        let w = py.detach(|| {
            if export_refused {
                core_::kernel::destroy_walk_export(
                    &self.inner,
                    &r,
                    start_page,
                    end_page,
                    c.as_ref(),
                )
                .map(|(w, _)| w)
            } else {
                core_::kernel::destroy_walk(&self.inner, &r, start_page, end_page, c.as_ref())
            }
        })?;
        Ok(w.into())
    }

    #[pyo3(signature = (handle, region, start_page, npages, *, export_first))]
    fn import_range(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_handle)] handle: u64,
        region: PyRef<'_, Region>,
        #[pyo3(from_py_with = a_start_page)] start_page: u64,
        #[pyo3(from_py_with = a_npages)] npages: u64,
        export_first: bool,
    ) -> R<ImportResult> {
        let r = Arc::clone(&region.inner);
        let x = py.detach(|| {
            core_::kernel::import_range(&self.inner, handle, &r, start_page, npages, export_first)
        })?;
        Ok(x.into())
    }

    fn make_accessible_range(
        &self,
        py: Python<'_>,
        region: PyRef<'_, Region>,
        #[pyo3(from_py_with = a_start_page)] start_page: u64,
        #[pyo3(from_py_with = a_npages)] npages: u64,
    ) -> R<AccessResult> {
        let r = Arc::clone(&region.inner);
        let a = py
            .detach(|| core_::kernel::make_accessible_range(&self.inner, &r, start_page, npages))?;
        Ok(a.into())
    }

    #[pyo3(signature = (handle, region, addr, size, tweak, *, export_first, cancel = None))]
    #[allow(clippy::too_many_arguments)]
    fn unpack_range(
        &self,
        py: Python<'_>,
        #[pyo3(from_py_with = a_handle)] handle: u64,
        region: PyRef<'_, Region>,
        #[pyo3(from_py_with = a_addr)] addr: u64,
        #[pyo3(from_py_with = a_size)] size: u64,
        #[pyo3(from_py_with = a_tweak)] tweak: u64,
        export_first: bool,
        cancel: Option<PyRef<'_, CancelToken>>,
    ) -> R<UnpackResult> {
        let r = Arc::clone(&region.inner);
        let c = token(&cancel);
        let u = py.detach(|| {
            core_::kernel::unpack_range(
                &self.inner,
                handle,
                &r,
                addr,
                size,
                tweak,
                export_first,
                c.as_ref(),
            )
        })?;
        Ok(u.into())
    }

    #[pyo3(signature = (region, *, all_present = false))]
    fn mm_teardown(
        &self,
        py: Python<'_>,
        region: PyRef<'_, Region>,
        all_present: bool,
    ) -> R<TeardownResult> {
        let r = Arc::clone(&region.inner);
        let t = py.detach(|| core_::kernel::mm_teardown(&self.inner, &r, all_present))?;
        Ok(t.into())
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add(
        "build_profile",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    m.add("PAGE_SIZE", core_::PAGE_SIZE)?;
    m.add("BATCH_PAGES", core_::BATCH_PAGES)?;
    m.add("RC_EXECUTED", core_::rc::EXECUTED)?;
    m.add("RC_INV_CMD", core_::rc::INV_CMD)?;
    m.add("RC_INV_STATE", core_::rc::INV_STATE)?;
    m.add("RC_INV_LEN", core_::rc::INV_LEN)?;
    m.add("RC_NEED_DESTROY", core_::rc::NEED_DESTROY)?;
    m.add("RC_INV_GUEST_HANDLE", core_::rc::INV_GUEST_HANDLE)?;
    m.add("RC_INV_CPU_HANDLE", core_::rc::INV_CPU_HANDLE)?;
    m.add("RC_APQN_BOUND", core_::rc::APQN_BOUND)?;
    m.add("RC_PAGE_NOT_ACCESSIBLE", core_::rc::PAGE_NOT_ACCESSIBLE)?;
    m.add("SecureStorageAccess", py.get_type::<SecureStorageAccess>())?;
    m.add_class::<CancelToken>()?;
    m.add_class::<Region>()?;
    m.add_class::<Ultravisor>()?;
    image::register(m)?;
    results::register(m)?;
    account::register(m)?;
    Ok(())
}
