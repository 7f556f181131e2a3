//! Code generation settings for bpf-linker, which turns the crate's bitcode into BPF:
//! `alu32`, 32-bit sub-registers (kernel 5.1+; the agent needs 5.14+ anyway), which
//! saves the zero-extension instructions on the many 8, 16 and 32-bit header fields.

fn main() {
    println!("cargo::rustc-link-arg-bins=--cpu-features=+alu32");
}
