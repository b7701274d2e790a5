//! `staybound demo`: placeholder until the demonstration lands.

/// Runs the demonstration and returns its report.
///
/// # Errors
/// Any setup failure.
pub async fn run(_warmup: u64) -> anyhow::Result<String> {
    anyhow::bail!("the demo is not implemented yet")
}
