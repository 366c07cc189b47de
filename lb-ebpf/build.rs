use which::which;

/// The object is linked by `bpf-linker`, which cargo does not know about: rebuild when it changes
/// (for example after `cargo xtask setup` rebuilt it against a new nightly LLVM).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => panic!("bpf-linker not found ({e}); run `cargo xtask setup` first"),
    }
}
