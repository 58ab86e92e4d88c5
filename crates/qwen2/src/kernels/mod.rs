//! The math of the forward pass, as plain functions over slices.
//!
//! Each SIMD kernel has a scalar reference beside it (`*_scalar`) that says what it computes in the
//! plainest way; the tests check one against the other on awkward sizes. Threads come from one rayon pool
//! sized to the physical cores; inside a forward pass they spin between its parallel steps as a team
//! (see `pool.rs`).
//!
//! Weight products: `matmul.rs` dispatches on the stored form. Float weights (f32, bf16, f16; exact) use
//! the AVX2 tiles and packed GEMM of `float_x86.rs` where the CPU has them, else portable `wide` code.
//! Block-quantized GGUF weights (the fast, approximate form) go to `quantized.rs`: activations quantized
//! to 8 bits once per product, integer dot products on AVX2 / AVX-512 VNNI (`quantized_x86.rs`, chosen
//! at run time) or in portable Rust; where the CPU has AMX tiles, products of 12 or more tokens run on
//! them instead, in bf16 with f32 sums (`amx.rs`).

pub mod activation;
#[cfg(target_arch = "x86_64")]
mod amx;
pub mod attention;
#[cfg(target_arch = "x86_64")]
mod float_x86;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod quantized;
#[cfg(target_arch = "x86_64")]
mod quantized_x86;
pub mod rope;
pub mod stream;

pub use activation::{silu_mul, silu_mul_rows, softmax};
pub use attention::attention;
pub use matmul::{matmul, WeightElem, WeightSlice};
pub use norm::{rmsnorm, rmsnorm_rows};
pub use rope::{rope, RopeTable};
