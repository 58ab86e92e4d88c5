//! The binary is compiled for the build machine's CPU (`target-cpu=native` in `.cargo/config.toml`).
//! Running it on a CPU without those instructions would die with SIGILL; this check says why instead.

/// Returns an error message naming the missing instruction sets, if any.
pub fn check_features() -> Result<(), String> {
    #[allow(unused_mut)]
    let mut missing: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! need {
            ($($f:tt),*) => {$(
                if cfg!(target_feature = $f) && !std::arch::is_x86_feature_detected!($f) {
                    missing.push($f);
                }
            )*};
        }
        need!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512bf16",
            "avx512vnni"
        );
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "this binary was built for a CPU with {} but this CPU lacks them; rebuild on this machine (cargo build --release)",
            missing.join(", ")
        ))
    }
}

/// The SIMD features the binary was compiled with, for reports.
pub fn compiled_features() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(target_feature = "avx2") {
        v.push("avx2");
    }
    if cfg!(target_feature = "fma") {
        v.push("fma");
    }
    if cfg!(target_feature = "avx512f") {
        v.push("avx512f");
    }
    if cfg!(target_feature = "avx512vnni") {
        v.push("avx512vnni");
    }
    if cfg!(target_feature = "avx512bf16") {
        v.push("avx512bf16");
    }
    v
}
