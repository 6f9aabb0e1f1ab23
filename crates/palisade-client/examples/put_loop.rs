//! Quick latency loop (the full load generator is `palisade bench`):
//!
//! ```sh
//! cargo run --release -p palisade-client --example put_loop -- ENDPOINTS OPS [put|get|get-lease|get-session|get-bounded|get-stale|get-at|lock] [CLIENTS]
//! cargo run --release -p palisade-client --example put_loop -- 127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003 5000 put 1
//! ```
//!
//! Closed loop: CLIENTS tasks sharing one client issue OPS operations in
//! total: puts of 256-byte values to 8-byte keys, or gets at a read level
//! (`get-at`: each key at the revision of its warm-up write), or `lock`:
//! each client takes and releases its own lock with a lease granted up
//! front, and the time to acquire is measured.
//! Prints throughput and latency percentiles.

use std::time::{Duration, Instant};

use palisade_client::{Client, ReadOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let endpoints = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003".into());
    let n: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(2000);
    let mode = args.next().unwrap_or_else(|| "put".into());
    let reads = mode.starts_with("get");
    let opts = match mode.as_str() {
        "get-lease" => ReadOptions::lease(),
        "get-session" => ReadOptions::session(),
        "get-stale" => ReadOptions::stale(),
        "get-bounded" => ReadOptions::bounded(Duration::from_millis(500)),
        _ => ReadOptions::linearizable(),
    };
    let clients: usize = args
        .next()
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1)
        .max(1);
    let client = Client::connect(endpoints.split(',').map(str::to_string)).await?;
    let value = vec![b'x'; 256];
    // Warm up: channels, leader cache, keys to read.
    let mut revisions = Vec::with_capacity(200);
    for i in 0..200 {
        let r = client.put(format!("{:08}", i), value.clone()).await?;
        revisions.push(r.header.map_or(0, |h| h.revision));
    }
    let revisions = std::sync::Arc::new(revisions);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = client.clone();
        let value = value.clone();
        let revisions = revisions.clone();
        let mode = mode.clone();
        let ops = n / clients;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(ops);
            for i in 0..ops {
                let k = (c * ops + i) % 200;
                let key = format!("{k:08}");
                let opts = if mode == "get-at" {
                    ReadOptions::at_revision(revisions[k])
                } else {
                    opts
                };
                if mode == "lock" {
                    let name = format!("{{l{c}}}lock");
                    let lease = client
                        .lease_grant(Duration::from_secs(30), name.as_bytes())
                        .await
                        .expect("lease");
                    let t = Instant::now();
                    let token = client
                        .lock(name.clone(), lease, Duration::from_secs(5))
                        .await
                        .expect("lock");
                    lat.push(t.elapsed());
                    client.unlock(&token).await.expect("unlock");
                    client.lease_revoke(lease).await.expect("revoke");
                    continue;
                }
                let t = Instant::now();
                let res = if reads {
                    client.get_with(key, opts).await.map(|_| ())
                } else {
                    client.put(key, value.clone()).await.map(|_| ())
                };
                res.expect("operation failed");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat: Vec<Duration> = Vec::with_capacity(n);
    for t in tasks {
        lat.extend(t.await?);
    }
    let total = start.elapsed();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "{} {}, {clients} clients, 256 B values: {:.0} ops/s  p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        lat.len(),
        if reads || mode == "lock" {
            mode.as_str()
        } else {
            "puts"
        },
        lat.len() as f64 / total.as_secs_f64(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        lat[lat.len() - 1]
    );
    Ok(())
}
