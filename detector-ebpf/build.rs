//! Code generation settings for bpf-linker, which turns the crate's bitcode into BPF.
//! - `alu32`: 32-bit sub-registers (kernel 5.1+; the agent needs 5.14+ anyway).
//! - `allows-misaligned-mem-access`: header fields sit at unaligned packet offsets (the
//!   IPv4 addresses of an untagged frame start at byte 26); without it LLVM splits every
//!   such load into byte loads. The kernels this runs on (x86-64, arm64) allow unaligned
//!   packet access.

fn main() {
    println!("cargo::rustc-link-arg-bins=--cpu-features=+alu32,+allows-misaligned-mem-access");
}
