//! The xdplb agent as a library: the `xdplb` binary is a thin CLI over it, and the tests run it
//! in-process.

pub mod config;
pub mod maglev;
