//! `agent._native`: the Rust fast path of simswarm-agent. This file holds only the module definition.
//!
//! One narrow function, [`fetch::fetch`], fills byte ranges of preallocated files from presigned GET
//! URLs; three small ones in [`s3`] sign those URLs and read listings, so a pull needs no botocore.
//! Python does the planning and the final rename.
use pyo3::prelude::*;

mod client;
mod deadline;
mod digest;
mod error;
mod fetch;
mod part;
mod policy;
mod proxy;
mod readback;
mod response;
mod s3;
mod small;
mod spec;
mod transfer;
mod whole;

/// The crate version, so Python can tell which build it loaded.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(fetch::fetch, m)?)?;
    m.add_function(wrap_pyfunction!(s3::presign_get, m)?)?;
    m.add_function(wrap_pyfunction!(s3::presign_list, m)?)?;
    m.add_function(wrap_pyfunction!(s3::parse_list, m)?)?;
    m.add_function(wrap_pyfunction!(small::get_small, m)?)?;
    m.add_function(wrap_pyfunction!(policy::retryable_statuses, m)?)?;
    m.add_function(wrap_pyfunction!(policy::retry_defaults, m)?)?;
    error::add_exceptions(m)?;
    Ok(())
}
