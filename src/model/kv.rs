//! The KV cache: F16, one contiguous buffer per layer for keys and one for values.

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

pub struct KvCache {
    pub n_ctx: usize,
    pub kv_dim: usize,
    /// `[n_layer][n_ctx, kv_dim]` f16 bits. Zero-initialised through the allocator, so pages
    /// are only touched (and resident) as the context fills.
    k: Vec<Vec<u16>>,
    /// `[n_layer][n_ctx, kv_dim]` f16 bits.
    v: Vec<Vec<u16>>,
}

impl KvCache {
    pub fn new(n_layer: usize, n_ctx: usize, kv_dim: usize) -> Self {
        let buf = || (0..n_layer).map(|_| vec![0u16; n_ctx * kv_dim]).collect();
        Self {
            n_ctx,
            kv_dim,
            k: buf(),
            v: buf(),
        }
    }

    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.n_ctx * self.kv_dim * 2
    }

    /// Store one position's key and value rows of layer `il`.
    pub fn store(&mut self, il: usize, pos: usize, k: &[f32], v: &[f32]) {
        let d = self.kv_dim;
        self.k[il][pos * d..(pos + 1) * d]
            .reinterpret_cast_mut::<f16>()
            .convert_from_f32_slice(k);
        self.v[il][pos * d..(pos + 1) * d]
            .reinterpret_cast_mut::<f16>()
            .convert_from_f32_slice(v);
    }

    /// Keys of layer `il`, `[n_ctx, kv_dim]`.
    pub fn keys(&self, il: usize) -> &[f16] {
        self.k[il].reinterpret_cast()
    }

    /// Values of layer `il`, `[n_ctx, kv_dim]`.
    pub fn values(&self, il: usize) -> &[f16] {
        self.v[il].reinterpret_cast()
    }
}
