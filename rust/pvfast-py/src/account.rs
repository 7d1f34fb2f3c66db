//! Accounting glue: `Account` (one emulated thread's or VM's counters and modelled clock), the
//! per-thread binding, and `KernelMutex` (a mutex that takes part in the modelled clock).

use std::sync::Arc;
use std::time::{Duration, Instant};

use pvfast_core as core_;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::results::AccountSnapshot;

/// The UV work of one emulated thread or VM: UVC and walk counters, CPU time, modelled clock.
#[pyclass(frozen, module = "pvfast._native")]
pub struct Account {
    pub(crate) inner: Arc<core_::Account>,
}

#[pymethods]
impl Account {
    /// Unique id (never reused in this process).
    #[getter]
    fn id(&self) -> u64 {
        self.inner.id()
    }

    /// The modelled clock in picoseconds.
    #[getter]
    fn clock_ps(&self) -> u64 {
        self.inner.clock_ps()
    }

    /// A wait: move the clock to at least `ps`; returns the clock afterwards.
    fn advance_to(&self, ps: u64) -> u64 {
        self.inner.advance_to(ps)
    }

    fn snapshot(&self) -> AccountSnapshot {
        self.inner.snapshot().into()
    }

    /// Zero the usage counters (the clock stays).
    fn reset(&self) {
        self.inner.reset();
    }

    fn __repr__(&self) -> String {
        format!(
            "Account(id={}, clock_ps={})",
            self.inner.id(),
            self.inner.clock_ps()
        )
    }
}

fn arc_of(a: Option<PyRef<'_, Account>>) -> Option<Arc<core_::Account>> {
    a.map(|a| Arc::clone(&a.inner))
}

/// Charge the calling thread's UV work from now on to `thread` (its emulated thread) and `vm`
/// (the VM it works on); None unbinds.
#[pyfunction]
#[pyo3(signature = (thread, vm = None))]
fn bind_accounts(thread: Option<PyRef<'_, Account>>, vm: Option<PyRef<'_, Account>>) {
    core_::account::bind(core_::Binding {
        thread: arc_of(thread),
        vm: arc_of(vm),
    });
}

/// The modelled clock (ps) of the calling thread's bound thread account; None if unbound.
#[pyfunction]
fn current_clock_ps() -> Option<u64> {
    core_::account::current_clock_ps()
}

/// A wait of the calling thread: its bound thread account's clock moves to at least `ps`.
/// Returns the clock afterwards; None if no thread account is bound.
#[pyfunction]
fn advance_clock_to(ps: u64) -> Option<u64> {
    core_::account::advance_current_to(ps)
}

/// Benchmarks only: switch per-account counting and CPU timing off (or back on).
#[pyfunction]
fn set_accounting_enabled(on: bool) {
    core_::account::set_enabled(on);
}

/// A mutex (the emulated kvm->lock) whose waits take part in the modelled clock: a thread
/// acquiring it at a modelled time inside another thread's last non-empty hold moves to the
/// end of that hold. The usual lock methods; waiting releases the GIL and ends with the
/// exception of a Python signal handler (Ctrl-C), as threading.Lock's does.
#[pyclass(frozen, module = "pvfast._native")]
pub struct KernelMutex {
    inner: core_::ModelMutex,
}

/// How long a blocked acquire waits (GIL released) between checks for Python signals, so a
/// Ctrl-C reaches a thread blocked on the mutex as it reaches one blocked on threading.Lock.
const SIGNAL_CHECK: Duration = Duration::from_millis(20);

impl KernelMutex {
    /// Wait for the mutex (None: for ever), GIL released, running Python's signal handlers every
    /// SIGNAL_CHECK (their exception ends the wait). False on timeout.
    fn wait(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let step = match deadline {
                None => SIGNAL_CHECK,
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .min(SIGNAL_CHECK),
            };
            if py.detach(|| self.inner.lock(Some(step))) {
                return Ok(true);
            }
            py.check_signals()?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(false);
            }
        }
    }
}

#[pymethods]
impl KernelMutex {
    #[new]
    fn new() -> Self {
        KernelMutex {
            inner: core_::ModelMutex::new(),
        }
    }

    #[pyo3(signature = (blocking = true, timeout = -1.0))]
    fn acquire(&self, py: Python<'_>, blocking: bool, timeout: f64) -> PyResult<bool> {
        if self.inner.try_lock() {
            return Ok(true);
        }
        if !blocking {
            if timeout != -1.0 {
                return Err(PyValueError::new_err(
                    "timeout: can't specify a timeout for a non-blocking call",
                ));
            }
            return Ok(false);
        }
        let wait = if timeout < 0.0 {
            if timeout != -1.0 {
                return Err(PyValueError::new_err(
                    "timeout: value must be a non-negative number",
                ));
            }
            None
        } else {
            Some(Duration::try_from_secs_f64(timeout).map_err(|_| {
                PyValueError::new_err(format!("timeout: {timeout} is out of range"))
            })?)
        };
        self.wait(py, wait)
    }

    fn release(&self) -> PyResult<()> {
        if self.inner.unlock() {
            Ok(())
        } else {
            Err(PyRuntimeError::new_err("release unlocked lock"))
        }
    }

    fn locked(&self) -> bool {
        self.inner.is_locked()
    }

    fn __enter__(&self, py: Python<'_>) -> PyResult<bool> {
        if self.inner.try_lock() {
            return Ok(true);
        }
        self.wait(py, None)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> PyResult<()> {
        self.release()
    }

    fn __repr__(&self) -> String {
        format!(
            "<KernelMutex {}>",
            if self.inner.is_locked() {
                "locked"
            } else {
                "unlocked"
            }
        )
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Account>()?;
    m.add_class::<KernelMutex>()?;
    m.add_function(wrap_pyfunction!(bind_accounts, m)?)?;
    m.add_function(wrap_pyfunction!(current_clock_ps, m)?)?;
    m.add_function(wrap_pyfunction!(advance_clock_to, m)?)?;
    m.add_function(wrap_pyfunction!(set_accounting_enabled, m)?)?;
    let names: Vec<&str> = core_::Uvc::ALL.iter().map(|u| u.name()).collect();
    m.add("UVC_NAMES", PyTuple::new(m.py(), names)?)?;
    Ok(())
}
