//! (family placeholder: being written)
use super::GgmlType;

pub fn dequantize_row(ty: GgmlType, _src: &[u8], _dst: &mut [f32]) {
    unimplemented!("dequantize {ty}")
}
pub fn quantize_row(ty: GgmlType, _src: &[f32], _dst: &mut [u8]) {
    unimplemented!("quantize {ty}")
}
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> f32 {
    vec_dot_scalar(ty, n, w, act)
}
pub fn vec_dot_scalar(ty: GgmlType, _n: usize, _w: &[u8], _act: &[u8]) -> f32 {
    unimplemented!("vec_dot {ty}")
}
