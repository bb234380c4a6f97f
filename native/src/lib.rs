//! `agent._native`: the Rust fast path of simswarm-agent. This file holds only the module definition.
//!
//! One narrow function, [`fetch::fetch`], fills byte ranges of preallocated files from presigned GET
//! URLs; Python does the planning, signing and final verification.
use pyo3::prelude::*;

mod backoff;
mod client;
mod deadline;
mod error;
mod fetch;
mod part;
mod proxy;
mod response;
mod spec;
mod transfer;

/// The crate version, so Python can tell which build it loaded.
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_function(wrap_pyfunction!(fetch::fetch, m)?)?;
    error::add_exceptions(m)?;
    Ok(())
}
