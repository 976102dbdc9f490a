//! Plain CPU implementations of every operation: the oracle of the tests, and a fallback users can call.

pub mod ep;
pub mod grouped_gemm;
pub mod layer;
pub mod low_dim;
pub mod permute;
pub mod route;
pub mod subbit;
