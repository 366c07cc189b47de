//! Test support for xdplb: network namespace topologies, packet builder and the shared fixture
//! table.

pub mod bench;
pub mod fixtures;
pub mod ha;
pub mod netns;
pub mod packet;
pub mod streams;
pub mod topology;
pub mod topology6;
