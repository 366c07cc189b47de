//! The xdplb agent as a library: the `xdplb` binary is a thin CLI over it, and the tests run it
//! in-process.

pub mod agent;
pub mod api;
pub mod config;
pub mod dataplane;
pub mod ha;
pub mod health;
pub mod logging;
pub mod maglev;
pub mod metrics;
pub mod net;
pub mod probe;
pub mod reconciler;
pub mod replace;
pub mod status;
