pub fn xdp(_a: crate::cli::BenchArgs) -> anyhow::Result<()> {
    Ok(())
}
