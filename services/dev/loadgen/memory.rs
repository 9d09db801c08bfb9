//! The server's resident memory: scraped from its Prometheus endpoint, or
//! read from `/proc` for the sink this process spawned.

use std::time::Duration;

/// Where the server's resident memory is read.
#[derive(Debug, Clone)]
pub(super) enum MemorySource {
    /// `process_resident_memory_bytes` on a Prometheus endpoint.
    Metrics(String),
    /// VmRSS of a local process (the sink we spawned).
    Process(u32),
}

impl MemorySource {
    /// Bytes, or why they are unknown. Blocking: call it off the runtime's threads.
    pub(super) fn read(&self) -> Result<u64, String> {
        match self {
            MemorySource::Metrics(url) => scrape_resident(url).map_err(|e| format!("{url}: {e}")),
            MemorySource::Process(pid) => process_resident(*pid),
        }
    }
}

fn scrape_resident(url: &str) -> Result<u64, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let text = agent
        .get(url)
        .call()
        .and_then(|mut response| response.body_mut().read_to_string())
        .map_err(|e| e.to_string())?;
    resident_from_prometheus(&text).ok_or_else(|| "no process_resident_memory_bytes sample".to_owned())
}

/// The value of `process_resident_memory_bytes` in Prometheus text format.
pub(super) fn resident_from_prometheus(text: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix("process_resident_memory_bytes")?;
        // Skip a longer metric name that merely starts the same way.
        if !rest.starts_with([' ', '{']) {
            return None;
        }
        let value = match rest.rfind('}') {
            Some(end) => &rest[end + 1..],
            None => rest,
        };
        let bytes: f64 = value.split_whitespace().next()?.parse().ok()?;
        (bytes.is_finite() && bytes >= 0.0).then_some(bytes as u64)
    })
}

fn process_resident(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    status
        .lines()
        .find_map(|line| {
            let kib: u64 = line
                .strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()?;
            Some(kib * 1024)
        })
        .ok_or_else(|| format!("{path}: no VmRSS"))
}
