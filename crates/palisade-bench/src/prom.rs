//! Reading Prometheus text-format metrics (etcd's `/metrics`).

use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `/metrics` over plain HTTP/1.0 (the text format needs no client
/// library).
pub async fn fetch_metrics(host_port: &str) -> anyhow::Result<String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(host_port).await?;
        stream
            .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {host_port}\r\n\r\n").as_bytes())
            .await?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await?;
        anyhow::Ok(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .context("metrics request timed out")?
}

/// The sum of every sample of metric `name` (over its label sets).
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            // Exactly this metric: a label set or the value follows.
            if !(rest.starts_with('{') || rest.starts_with(' ')) {
                return None;
            }
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::metric_sum;

    #[test]
    fn sums_samples_of_one_metric_only() {
        let text = "# HELP x\n\
                    etcd_disk_wal_fsync_duration_seconds_count 12\n\
                    etcd_disk_wal_fsync_duration_seconds_sum 0.5\n\
                    process_resident_memory_bytes 3.5e+07\n\
                    a{l=\"1\"} 2\na{l=\"2\"} 3\nab 100\n";
        assert_eq!(
            metric_sum(text, "etcd_disk_wal_fsync_duration_seconds_count"),
            12.0
        );
        assert_eq!(metric_sum(text, "process_resident_memory_bytes"), 3.5e7);
        assert_eq!(metric_sum(text, "a"), 5.0);
        assert_eq!(metric_sum(text, "missing"), 0.0);
    }
}
