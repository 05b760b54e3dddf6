//! Run-time CPU feature detection, evaluated once.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

#[derive(Debug, Clone, Copy)]
pub struct Features {
    pub avx2_fma: bool,
    pub f16c: bool,
    pub avx512: bool,
    pub avx512_vnni: bool,
}

static FEATURES: OnceLock<Features> = OnceLock::new();
static FORCE: OnceLock<Isa> = OnceLock::new();

pub fn features() -> Features {
    *FEATURES.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    Features {
        avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        f16c: is_x86_feature_detected!("f16c"),
        avx512: is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl"),
        avx512_vnni: is_x86_feature_detected!("avx512vnni"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Features {
    Features {
        avx2_fma: false,
        f16c: false,
        avx512: false,
        avx512_vnni: false,
    }
}

/// The best instruction set available, unless capped with `LETHE_ISA=scalar|avx2|avx512`
/// (read once) or [`force_isa`].
pub fn isa() -> Isa {
    *FORCE.get_or_init(|| {
        let f = features();
        let best = if f.avx512 && f.avx2_fma {
            Isa::Avx512
        } else if f.avx2_fma {
            Isa::Avx2
        } else {
            Isa::Scalar
        };
        match std::env::var("LETHE_ISA").ok().as_deref() {
            Some("scalar") => Isa::Scalar,
            Some("avx2") if f.avx2_fma => Isa::Avx2,
            _ => best,
        }
    })
}

/// Cap the instruction set for this process (first call wins; for tests and benches).
pub fn force_isa(isa: Isa) -> bool {
    FORCE.set(isa).is_ok()
}
