//! Where a role's tensors live: the one parser of `cpu` / `cuda` / `cuda:N`, for every role, the
//! config and the command line.
//!
//! Parsing the form ([`DeviceSpec`]) is separate from opening the device ([`DeviceSpec::open`]):
//! a run config is checked (`ril config check`) on machines that may have no GPU or a build
//! without CUDA, while the role that runs on the device opens it at start.

use std::fmt;
use std::str::FromStr;

use candle_core::{Device, DeviceLocation};

/// What can be wrong with a device string; each names the string. A wrapped error's text is part
/// of the message, so it is not also the `source` (a chain printer would print it twice).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device {spec:?}: expected cpu, cuda or cuda:N (N a GPU ordinal, e.g. cuda:0)")]
    UnknownForm { spec: String },
    #[error("device {spec:?}: this build has no CUDA support (build with --features cuda)")]
    NoCuda { spec: String },
    #[error("device {spec:?}: CUDA device {ordinal} cannot be opened: {error}")]
    CannotOpen {
        spec: String,
        ordinal: usize,
        /// Boxed: the error types that wrap this one stay small.
        error: Box<candle_core::Error>,
    },
}

/// A parsed device string, not yet opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// A GPU by ordinal (`cuda` is `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(spec: &str) -> Result<Self, DeviceError> {
        let unknown = || DeviceError::UnknownForm {
            spec: spec.to_string(),
        };
        match spec {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            s => s
                .strip_prefix("cuda:")
                // `usize::from_str` takes a leading `+`; an ordinal is digits only.
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(unknown),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. `spec` is the string it was parsed from, for the error.
    pub fn open(self, spec: &str) -> Result<Device, DeviceError> {
        let Self::Cuda(ordinal) = self else {
            return Ok(Device::Cpu);
        };
        if !candle_core::utils::cuda_is_available() {
            return Err(DeviceError::NoCuda {
                spec: spec.to_string(),
            });
        }
        Device::new_cuda(ordinal).map_err(|error| DeviceError::CannotOpen {
            spec: spec.to_string(),
            ordinal,
            error: Box::new(error),
        })
    }
}

/// Parses and opens `cpu`, `cuda` or `cuda:N`.
pub fn parse(spec: &str) -> Result<Device, DeviceError> {
    spec.parse::<DeviceSpec>()?.open(spec)
}

/// The device as its string: `cpu`, `cuda:N` (what logs, status and reports show).
pub fn describe(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_parse_and_print_back() {
        for (spec, parsed, printed) in [
            ("cpu", DeviceSpec::Cpu, "cpu"),
            ("cuda", DeviceSpec::Cuda(0), "cuda:0"),
            ("cuda:0", DeviceSpec::Cuda(0), "cuda:0"),
            ("cuda:3", DeviceSpec::Cuda(3), "cuda:3"),
        ] {
            let got: DeviceSpec = spec.parse().unwrap();
            assert_eq!(got, parsed, "{spec}");
            assert_eq!(got.to_string(), printed, "{spec}");
        }
    }

    #[test]
    fn other_forms_are_refused_naming_the_string() {
        for spec in [
            "", "gpu", "CPU", "cuda:", "cuda:x", "cuda:+1", "cuda:-1", "cuda0", "cuda:0 ", "metal",
        ] {
            let e = spec.parse::<DeviceSpec>().unwrap_err();
            assert!(matches!(e, DeviceError::UnknownForm { .. }), "{spec}: {e}");
            let text = e.to_string();
            assert!(text.contains(&format!("{spec:?}")), "{text}");
            assert!(text.contains("expected cpu, cuda or cuda:N"), "{text}");
        }
    }

    #[test]
    fn cpu_opens_and_describes_itself() {
        let device = parse("cpu").unwrap();
        assert!(device.is_cpu());
        assert_eq!(describe(&device), "cpu");
    }

    /// Without the `cuda` feature a CUDA device is refused, saying how to get one.
    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_build_without_cuda_says_so() {
        let e = parse("cuda:3").unwrap_err();
        assert!(matches!(e, DeviceError::NoCuda { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            "device \"cuda:3\": this build has no CUDA support (build with --features cuda)"
        );
    }
}
