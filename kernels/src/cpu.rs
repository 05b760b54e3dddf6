//! Run-time CPU feature detection and the one instruction-set level every kernel runs at, each
//! evaluated once.

use std::sync::OnceLock;

/// Instruction-set levels of the SIMD kernels, lowest first. `Avx2` is AVX2 + FMA + F16C;
/// `Avx512` adds AVX-512 F/BW/VL, and its kernels use VNNI where the CPU has it ([`vnni`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
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
static LEVEL: OnceLock<Isa> = OnceLock::new();

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

/// The highest level this CPU runs.
fn best() -> Isa {
    let f = features();
    if !(f.avx2_fma && f.f16c) {
        Isa::Scalar
    } else if f.avx512 {
        Isa::Avx512
    } else {
        Isa::Avx2
    }
}

/// `want` capped at what this CPU runs.
pub fn cap(want: Isa) -> Isa {
    want.min(best())
}

/// The level the kernels run at: the best this CPU has, unless capped with
/// `LETHE_ISA=scalar|avx2|avx512` (read once) or [`force_isa`].
pub fn isa() -> Isa {
    *LEVEL.get_or_init(|| match std::env::var("LETHE_ISA").ok().as_deref() {
        Some("scalar") => Isa::Scalar,
        Some("avx2") => cap(Isa::Avx2),
        _ => best(),
    })
}

/// Cap the instruction set for this process (first call wins; for tests and benches). The
/// level is capped at what the CPU runs.
pub fn force_isa(isa: Isa) -> bool {
    LEVEL.set(cap(isa)).is_ok()
}

/// Whether kernels at level `isa` use AVX-512 VNNI (`vpdpbusd`, `vpdpwssd` on 256-bit
/// vectors): at `Avx512` on a CPU that has it.
#[inline]
pub fn vnni(isa: Isa) -> bool {
    isa == Isa::Avx512 && features().avx512_vnni
}
