//! Glue for pvfast_core::image: sealing and inspecting boot images, plus two helpers
//! (image_decrypt_page, image_verify) that drive the UV-side code directly for tests.
//! Argument conversion and error mapping only.

use pvfast_core::image::{
    parse_header, random_image_key, seal_image, HeaderError, SecHeader, Verifier, HOST_KEY_DEFAULT,
    IMAGE_KEY_LEN, MAX_COMPONENTS, MAX_HEADER_LEN,
};
use pvfast_core::{rc, PAGE_SIZE};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyTuple};

use crate::results::SealedImage;

/// ValueError carrying the UV rc as attribute `rc`, e.g. "... (rc 0x0108)".
fn header_error(py: Python<'_>, err: &HeaderError) -> PyErr {
    let rc = err.rc();
    let pyerr = PyValueError::new_err(format!("invalid SE header: {err} (rc {rc:#06x})"));
    // Setting an attribute on a fresh ValueError instance cannot fail in practice; if it
    // did, the message still carries the rc.
    let _ = pyerr.value(py).setattr("rc", rc);
    pyerr
}

fn key_arg<const N: usize>(
    name: &str,
    value: Option<&PyBackedBytes>,
    default: &[u8; N],
) -> PyResult<[u8; N]> {
    match value {
        None => Ok(*default),
        Some(bytes) => <[u8; N]>::try_from(&bytes[..]).map_err(|_| {
            PyValueError::new_err(format!("{name}: must be {N} bytes, got {}", bytes.len()))
        }),
    }
}

fn u64_item(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<u64> {
    if obj.is_instance_of::<pyo3::types::PyBool>() || !obj.is_instance_of::<PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "{name}: expected int, got {}",
            obj.get_type().name()?
        )));
    }
    obj.extract::<u64>()
        .map_err(|_| PyValueError::new_err(format!("{name}: {obj} is out of range [0, 2**64)")))
}

fn bytes_item(name: &str, obj: &Bound<'_, PyAny>) -> PyResult<PyBackedBytes> {
    match obj.extract::<PyBackedBytes>() {
        Ok(b) => Ok(b),
        Err(_) => Err(PyTypeError::new_err(format!(
            "{name}: expected bytes, got {}",
            obj.get_type().name()?
        ))),
    }
}

/// Items of a list argument as fixed-size tuples, with errors naming `name[i]`.
fn tuple_items<'py>(
    name: &str,
    list: &Bound<'py, PyAny>,
    arity: usize,
    shape: &str,
) -> PyResult<Vec<Bound<'py, PyTuple>>> {
    let list = list
        .cast::<PyList>()
        .map_err(|_| PyTypeError::new_err(format!("{name}: expected a list of {shape}")))?;
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.iter().enumerate() {
        let tuple = item
            .cast_into::<PyTuple>()
            .map_err(|_| PyTypeError::new_err(format!("{name}[{i}]: expected a tuple {shape}")))?;
        if tuple.len() != arity {
            return Err(PyValueError::new_err(format!(
                "{name}[{i}]: expected a tuple {shape}, got {} items",
                tuple.len()
            )));
        }
        out.push(tuple);
    }
    Ok(out)
}

fn parse(py: Python<'_>, header: &[u8], host_key: &[u8; 32]) -> PyResult<SecHeader> {
    parse_header(header, host_key).map_err(|e| header_error(py, &e))
}

/// Seal a boot image: the header and the encrypted components padded to 4 KiB.
#[pyfunction]
#[pyo3(signature = (components, host_key=None, image_key=None))]
fn image_seal<'py>(
    py: Python<'py>,
    components: &Bound<'py, PyAny>,
    host_key: Option<PyBackedBytes>,
    image_key: Option<PyBackedBytes>,
) -> PyResult<SealedImage> {
    let host_key = key_arg("host_key", host_key.as_ref(), &HOST_KEY_DEFAULT)?;
    let image_key: [u8; IMAGE_KEY_LEN] = match image_key.as_ref() {
        Some(_) => key_arg("image_key", image_key.as_ref(), &[0u8; IMAGE_KEY_LEN])?,
        None => random_image_key().map_err(PyValueError::new_err)?,
    };
    let shape = "(addr, tweak, data)";
    let mut owned: Vec<(u64, u64, PyBackedBytes)> = Vec::new();
    for (i, t) in tuple_items("components", components, 3, shape)?
        .iter()
        .enumerate()
    {
        owned.push((
            u64_item(&format!("components[{i}].addr"), &t.get_item(0)?)?,
            u64_item(&format!("components[{i}].tweak"), &t.get_item(1)?)?,
            bytes_item(&format!("components[{i}].data"), &t.get_item(2)?)?,
        ));
    }
    let (header, encrypted) = py
        .detach(|| {
            let refs: Vec<(u64, u64, &[u8])> =
                owned.iter().map(|(a, t, d)| (*a, *t, &d[..])).collect();
            seal_image(&refs, &host_key, &image_key)
        })
        .map_err(PyValueError::new_err)?;
    Ok(SealedImage {
        header,
        components: encrypted,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parse and authenticate a header as SET_SEC_CONF_PARAMS does.
#[pyfunction]
#[pyo3(signature = (header, host_key=None))]
fn image_parse<'py>(
    py: Python<'py>,
    header: PyBackedBytes,
    host_key: Option<PyBackedBytes>,
) -> PyResult<Bound<'py, PyDict>> {
    let host_key = key_arg("host_key", host_key.as_ref(), &HOST_KEY_DEFAULT)?;
    let hdr = parse(py, &header, &host_key)?;
    let dict = PyDict::new(py);
    dict.set_item("version", hdr.version())?;
    dict.set_item("length", hdr.length())?;
    dict.set_item("pages", hdr.pages())?;
    let components: Vec<(u64, u64, u64)> = hdr
        .components()
        .iter()
        .map(|c| (c.addr, c.size, c.tweak))
        .collect();
    dict.set_item("components", components)?;
    dict.set_item("pld", hex(hdr.pld()))?;
    dict.set_item("ald", hex(hdr.ald()))?;
    dict.set_item("tld", hex(hdr.tld()))?;
    Ok(dict)
}

/// UNPACK's decryption of one 4096-byte page (test helper).
#[pyfunction]
#[pyo3(signature = (header, tweak0, tweak1, page, host_key=None))]
fn image_decrypt_page<'py>(
    py: Python<'py>,
    header: PyBackedBytes,
    tweak0: u64,
    tweak1: u64,
    page: PyBackedBytes,
    host_key: Option<PyBackedBytes>,
) -> PyResult<Bound<'py, PyBytes>> {
    let host_key = key_arg("host_key", host_key.as_ref(), &HOST_KEY_DEFAULT)?;
    if page.len() != PAGE_SIZE {
        return Err(PyValueError::new_err(format!(
            "page: must be {PAGE_SIZE} bytes, got {}",
            page.len()
        )));
    }
    let hdr = parse(py, &header, &host_key)?;
    let mut buf = page.to_vec();
    hdr.decrypt_page(tweak0, tweak1, &mut buf);
    Ok(PyBytes::new(py, &buf))
}

/// VERIFY over the given unpacked plaintext pages: 0x0001 or the mismatch rc (test helper).
#[pyfunction]
#[pyo3(signature = (header, pages, host_key=None))]
fn image_verify(
    py: Python<'_>,
    header: PyBackedBytes,
    pages: &Bound<'_, PyAny>,
    host_key: Option<PyBackedBytes>,
) -> PyResult<u16> {
    let host_key = key_arg("host_key", host_key.as_ref(), &HOST_KEY_DEFAULT)?;
    let hdr = parse(py, &header, &host_key)?;
    let shape = "(gaddr, tweak0, tweak1, plaintext)";
    let mut owned: Vec<(u64, u64, u64, PyBackedBytes)> = Vec::new();
    for (i, t) in tuple_items("pages", pages, 4, shape)?.iter().enumerate() {
        owned.push((
            u64_item(&format!("pages[{i}].gaddr"), &t.get_item(0)?)?,
            u64_item(&format!("pages[{i}].tweak0"), &t.get_item(1)?)?,
            u64_item(&format!("pages[{i}].tweak1"), &t.get_item(2)?)?,
            bytes_item(&format!("pages[{i}].plaintext"), &t.get_item(3)?)?,
        ));
    }
    let rc = py.detach(|| {
        let mut verifier = Verifier::new();
        for (gaddr, tweak0, tweak1, plaintext) in &owned {
            verifier.add_page(*gaddr, *tweak0, *tweak1, plaintext);
        }
        verifier.finish(&hdr).err().unwrap_or(rc::EXECUTED)
    });
    Ok(rc)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("HOST_KEY_DEFAULT", PyBytes::new(m.py(), &HOST_KEY_DEFAULT))?;
    m.add("IMAGE_MAX_HEADER_LEN", MAX_HEADER_LEN)?;
    m.add("IMAGE_MAX_COMPONENTS", MAX_COMPONENTS)?;
    m.add_function(wrap_pyfunction!(image_seal, m)?)?;
    m.add_function(wrap_pyfunction!(image_parse, m)?)?;
    m.add_function(wrap_pyfunction!(image_decrypt_page, m)?)?;
    m.add_function(wrap_pyfunction!(image_verify, m)?)?;
    Ok(())
}
