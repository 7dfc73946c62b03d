//! The Prometheus recorder every binary installs, its upkeep thread and
//! `jvpn_build_info`. Each binary keeps its own catalogue (`metrics.rs`) and
//! passes its `describe` function here.

use metrics::{describe_counter, describe_gauge};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Build information, one series per process; the value is always 1.
pub const BUILD_INFO: &str = "jvpn_build_info";

/// Why the recorder could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The exporter refused its configuration, or a recorder was already set.
    #[error("metrics recorder: {0}")]
    Recorder(#[from] BuildError),
    /// The upkeep thread could not be started.
    #[error("metrics upkeep thread: {0}")]
    Upkeep(#[from] std::io::Error),
}

/// How often queued histogram samples are folded into their buckets.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the recorder for any binary: `describe` names its catalogue and
/// `jvpn_build_info{component}` is set.
pub fn install_for(
    component: &'static str,
    describe: fn(),
) -> Result<PrometheusHandle, InstallError> {
    let buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        .install_recorder()?;
    // Histogram samples queue in the recorder until a render or an upkeep
    // drains them: without scrapes that queue grows with every request
    // (found by the churn soak, ~60 bytes per session). `install_recorder`
    // starts no upkeep of its own.
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        })?;
    describe();
    describe_gauge!(BUILD_INFO, "Build information; the value is always 1.");
    metrics::gauge!(BUILD_INFO, "component" => component, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    Ok(handle)
}

/// Describes a binary's SIGHUP reload counters, the pair it passes to
/// [`crate::process::reload_on_hangup`].
pub fn describe_reloads(applied: &'static str, refused: &'static str) {
    describe_counter!(applied, "Configuration reloads applied (SIGHUP).");
    describe_counter!(
        refused,
        "Reloads refused (invalid, or a restart-only key changed); the old configuration stays."
    );
}
