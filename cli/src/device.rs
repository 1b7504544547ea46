//! `--device cpu | cuda | cuda:N`: the one parser lives in `ril_model::device`.

pub use ril_model::device::{describe, parse};

/// A device string checked for its form only (a flag handed on to other processes, which open
/// the device themselves).
pub fn form(spec: &str) -> Result<String, ril_model::DeviceError> {
    spec.parse::<ril_model::DeviceSpec>()?;
    Ok(spec.to_string())
}
