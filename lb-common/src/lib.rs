//! Shared between the xdplb data path (`lb-ebpf`, built for `bpfel-unknown-none`), the agent
//! (`lb-userspace`) and the tests.
//!
//! Everything that both sides must agree on lives here, once: map names and their key/value
//! layouts ([`maps`]), the reasons every packet is counted under ([`Reason`]), the flow hash
//! ([`hash`]) and the per-packet decision itself ([`packet::process`]), written against two small
//! traits so that the same code runs in the kernel and in host unit tests.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod flows;
pub mod hash;
pub mod maps;
pub mod packet;
mod reason;

pub use reason::{Action, Reason};
