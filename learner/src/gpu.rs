//! What this build and this machine offer for GPU training.

/// Why GPU collectives cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GpuUnavailable {
    #[error("this build has no NCCL support: rebuild with `--features nccl`")]
    NotCompiled,
    #[error(
        "the CUDA driver library (libcuda.so.1) cannot be loaded: is an NVIDIA driver installed and visible?"
    )]
    NoCudaDriver,
    #[error(
        "the NCCL library (libnccl.so.2) cannot be loaded: install NCCL (e.g. the nvidia-nccl-cu12 wheel) and add its lib directory to LD_LIBRARY_PATH"
    )]
    NoNccl,
}

/// Checks that the CUDA driver and NCCL libraries can be loaded. cudarc loads them lazily and
/// panics when they are missing, so every NCCL code path calls this first. (Linked at build
/// time instead, `linked-cuda`, the process could not have started without them.)
#[allow(unsafe_code)]
pub fn nccl_available() -> Result<(), GpuUnavailable> {
    #[cfg(all(feature = "nccl", feature = "linked-cuda"))]
    {
        Ok(())
    }
    #[cfg(all(feature = "nccl", not(feature = "linked-cuda")))]
    {
        // SAFETY: these only try to dlopen the vendor libraries (running their initialisers,
        // which is why cudarc marks them unsafe); nothing is called through them here.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuUnavailable::NoCudaDriver);
        }
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(GpuUnavailable::NoNccl);
        }
        Ok(())
    }
    #[cfg(not(feature = "nccl"))]
    {
        Err(GpuUnavailable::NotCompiled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without the feature the answer is "not compiled"; with it, on a machine without CUDA
    /// (CI, development), the probe reports the missing library instead of panicking.
    #[test]
    fn probing_never_panics_and_says_what_is_missing() {
        match nccl_available() {
            Ok(()) => {}
            Err(e) => assert!(
                e.to_string().contains("NCCL") || e.to_string().contains("CUDA"),
                "{e}"
            ),
        }
        #[cfg(not(feature = "nccl"))]
        assert_eq!(nccl_available(), Err(GpuUnavailable::NotCompiled));
    }
}
