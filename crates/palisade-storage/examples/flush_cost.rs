//! Measures sled insert+flush latency on this machine.
use std::time::Instant;
fn main() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(None)
        .open()
        .unwrap();
    let t = db.open_tree("x").unwrap();
    let mut lat = vec![];
    for i in 0..2000u32 {
        t.insert(i.to_be_bytes(), vec![0u8; 300]).unwrap();
        let s = Instant::now();
        db.flush().unwrap();
        lat.push(s.elapsed());
    }
    lat.sort();
    println!(
        "flush p50 {:?} p90 {:?} p99 {:?} max {:?}",
        lat[1000], lat[1800], lat[1980], lat[1999]
    );
    let f = std::fs::File::create(dir.path().join("raw")).unwrap();
    use std::io::Write;
    let mut lat = vec![];
    let mut f = f;
    for _ in 0..2000 {
        f.write_all(&[0u8; 300]).unwrap();
        let s = Instant::now();
        f.sync_data().unwrap();
        lat.push(s.elapsed());
    }
    lat.sort();
    println!(
        "raw fdatasync p50 {:?} p90 {:?} p99 {:?} max {:?}",
        lat[1000], lat[1800], lat[1980], lat[1999]
    );
}
