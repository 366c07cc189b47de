#![no_std]
// Empty on purpose: this library target lets lb-userspace build-depend on the crate, so cargo
// rebuilds the agent (and the embedded object) when the eBPF sources change.
