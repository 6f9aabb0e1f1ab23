//! Quick single-client put (or, with a third argument `get`, linearizable
//! get) latency loop (the real benchmark is
//! `palisade bench`, to come). Usage:
//!
//! ```sh
//! cargo run --release -p palisade-client --example put_loop -- 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 5000 [get]
//! ```
//!
//! Sequential puts of 256-byte values to 8-byte keys; prints latency
//! percentiles and throughput.

use std::time::{Duration, Instant};

use palisade_client::Client;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let endpoints = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".into());
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let reads = args.next().as_deref() == Some("get");
    let client = Client::connect(endpoints.split(',').map(str::to_string)).await?;
    let value = vec![b'x'; 256];
    // Warm up: channels, leader cache.
    for i in 0..200 {
        client
            .put(format!("{:08}", i % 100_000), value.clone())
            .await?;
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(n);
    let start = Instant::now();
    for i in 0..n {
        let key = format!("{:08}", i % 100);
        let t = Instant::now();
        if reads {
            client.get(key).await?;
        } else {
            client.put(key, value.clone()).await?;
        }
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{n} {}, 1 client, 256 B values: {:.0} ops/s  p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        if reads { "linearizable gets" } else { "puts" },
        n as f64 / total.as_secs_f64(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        lat[lat.len() - 1]
    );
    Ok(())
}
