//! Builds the eBPF object from `detector-ebpf` with aya-build (bpf-linker, build-std=core)
//! and leaves it in OUT_DIR, where `src/sources/xdp` embeds it.

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = format!("{manifest_dir}/../detector-ebpf");
    let common_dir = format!("{manifest_dir}/../detector-common");
    println!("cargo:rerun-if-changed={common_dir}");
    // The eBPF crate needs `-Z build-std=core`. We build it with the same stable toolchain
    // as the rest of the workspace and enable unstable flags for that one cargo call,
    // so no nightly toolchain is needed.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "detector-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("stable"),
    )
}
