//! N records of 1 KiB, every commit fsync'd, in batches of 1 and 64, per store.

use std::io::Write;
use std::time::Instant;

const N: usize = 2000;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/async-stores".into());
    std::fs::create_dir_all(&dir).unwrap();
    let rec = vec![b'x'; 1024];
    for batch in [1usize, 64] {
        // Our own log: one write + fdatasync per batch.
        let p = format!("{dir}/log");
        let _ = std::fs::remove_file(&p);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        let t = Instant::now();
        let mut i = 0;
        while i < N {
            let mut buf = Vec::new();
            for _ in 0..batch.min(N - i) {
                buf.extend_from_slice(&(rec.len() as u32).to_le_bytes());
                buf.extend_from_slice(&rec);
                i += 1;
            }
            f.write_all(&buf).unwrap();
            f.sync_data().unwrap();
        }
        report("own log", batch, t);

        let p = format!("{dir}/redb");
        let _ = std::fs::remove_file(&p);
        let db = redb::Database::create(&p).unwrap();
        const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("q");
        let t = Instant::now();
        let mut i = 0u64;
        while (i as usize) < N {
            let tx = db.begin_write().unwrap();
            {
                let mut tab = tx.open_table(T).unwrap();
                for _ in 0..batch.min(N - i as usize) {
                    tab.insert(i, rec.as_slice()).unwrap();
                    i += 1;
                }
            }
            tx.commit().unwrap();
        }
        report("redb", batch, t);
        drop(db);

        let p = format!("{dir}/sqlite");
        for s in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{p}{s}"));
        }
        let mut c = rusqlite::Connection::open(&p).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.pragma_update(None, "synchronous", "FULL").unwrap();
        c.execute("create table q (id integer primary key, body blob)", [])
            .unwrap();
        let t = Instant::now();
        let mut i = 0;
        while i < N {
            let tx = c.transaction().unwrap();
            for _ in 0..batch.min(N - i) {
                tx.execute("insert into q (body) values (?1)", [&rec]).unwrap();
                i += 1;
            }
            tx.commit().unwrap();
        }
        report("sqlite wal full", batch, t);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn report(name: &str, batch: usize, t: Instant) {
    let s = t.elapsed().as_secs_f64();
    println!(
        "| {name} | {batch} | {:.3} s | {:.0} |",
        s,
        N as f64 / s
    );
}
