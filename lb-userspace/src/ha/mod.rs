//! High availability: two nodes share the VIPs with VRRPv3 (RFC 5798 / RFC 9568).

pub mod arp;
pub mod fsm;
pub mod proto;
