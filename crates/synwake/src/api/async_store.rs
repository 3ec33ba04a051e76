//! The durable async-call queue on disk: an append-only log, `<state_dir>/async/calls.log`.
//!
//! Every accepted call is one `accept` record, every failed attempt that will be retried
//! one `attempt` record (so the retry count and backoff survive a restart), every
//! finished call one `done` record. A
//! record is `len: u32 LE | crc32: u32 LE | payload`, so a torn tail (a crash mid-write) is
//! found and cut at the next start. Appends are written and fsync'd by one writer thread
//! in groups: every caller waiting at the same time shares one `fdatasync`, which is what
//! makes "durable before the 202" cheap under load (docs/benchmarks.md, "Async queue").
//! The log is rewritten with the live calls only at start and when it is mostly dead.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use bytes::{BufMut, Bytes, BytesMut};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("async queue {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("async queue writer has stopped")]
    Stopped,
}

/// One accepted call, as kept on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredCall {
    pub id: u64,
    /// Milliseconds since the Unix epoch at acceptance.
    pub accepted_ms: u64,
    pub function: String,
    pub method: String,
    /// Path and query sent to the function.
    pub path: String,
    pub callback: Option<String>,
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
    /// Failed attempts so far and when the next may start (ms since the epoch); kept in
    /// `attempt` records, not in the `accept` record.
    pub attempts: u32,
    pub retry_at_ms: u64,
}

const ACCEPT: u8 = 1;
const DONE: u8 = 2;
const ATTEMPT: u8 = 3;
/// Log size past which a mostly-dead log is rewritten with its live calls only.
const COMPACT_AT: u64 = 64 << 20;
/// Bytes per group write; more waiting appends go in the next group.
const GROUP_BYTES: usize = 8 << 20;

impl StoredCall {
    /// The whole `accept` record (header included), and the call read back from it.
    pub fn encode(&self) -> Bytes {
        let mut p = BytesMut::with_capacity(64 + self.path.len() + self.body.len());
        p.put_u8(ACCEPT);
        p.put_u64_le(self.id);
        p.put_u64_le(self.accepted_ms);
        for s in [
            self.function.as_str(),
            self.method.as_str(),
            self.path.as_str(),
            self.callback.as_deref().unwrap_or(""),
        ] {
            put_bytes(&mut p, s.as_bytes());
        }
        p.put_u32_le(self.headers.len() as u32);
        for (k, v) in &self.headers {
            put_bytes(&mut p, k.as_bytes());
            put_bytes(&mut p, v);
        }
        put_bytes(&mut p, &self.body);
        frame(&p)
    }

    /// The call in a whole record (as [`StoredCall::encode`] made it), sharing its memory.
    fn from_record(record: &Bytes) -> Option<StoredCall> {
        StoredCall::decode(&record.slice(8..))
    }

    fn decode(payload: &Bytes) -> Option<StoredCall> {
        let mut r = Reader { b: payload, at: 1 };
        let id = r.u64()?;
        let accepted_ms = r.u64()?;
        let function = r.string()?;
        let method = r.string()?;
        let path = r.string()?;
        let callback = Some(r.string()?).filter(|c| !c.is_empty());
        let n = r.u32()? as usize;
        let mut headers = Vec::with_capacity(n.min(256));
        for _ in 0..n {
            headers.push((r.string()?, r.bytes()?));
        }
        let body = r.bytes()?;
        Some(StoredCall {
            id,
            accepted_ms,
            function,
            method,
            path,
            callback,
            headers,
            body,
            attempts: 0,
            retry_at_ms: 0,
        })
    }
}

fn put_bytes(p: &mut BytesMut, b: &[u8]) {
    p.put_u32_le(b.len() as u32);
    p.put_slice(b);
}

fn frame(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(8 + payload.len());
    out.put_u32_le(payload.len() as u32);
    out.put_u32_le(crc32fast::hash(payload));
    out.put_slice(payload);
    out.freeze()
}

fn done_record(id: u64) -> Bytes {
    let mut p = BytesMut::with_capacity(9);
    p.put_u8(DONE);
    p.put_u64_le(id);
    frame(&p)
}

fn attempt_record(id: u64, attempts: u32, retry_at_ms: u64) -> Bytes {
    let mut p = BytesMut::with_capacity(21);
    p.put_u8(ATTEMPT);
    p.put_u64_le(id);
    p.put_u32_le(attempts);
    p.put_u64_le(retry_at_ms);
    frame(&p)
}

struct Reader<'a> {
    b: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<Bytes> {
        let end = self.at.checked_add(n)?;
        if end > self.b.len() {
            return None;
        }
        let s = self.b.slice(self.at..end);
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.as_ref().try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.as_ref().try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<Bytes> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
}

enum Op {
    Append {
        id: u64,
        record: Bytes,
        done: tokio::sync::oneshot::Sender<io::Result<()>>,
    },
    Done(u64),
    Attempt {
        id: u64,
        attempts: u32,
        retry_at_ms: u64,
    },
}

/// The queue's log; cheap to clone. Dropping the last clone stops the writer thread.
#[derive(Clone)]
pub struct CallStore {
    tx: mpsc::Sender<Op>,
    path: PathBuf,
    /// Group writes made (each one write + one fdatasync), for the syncs metric.
    syncs: Arc<AtomicU64>,
}

impl CallStore {
    /// Opens (or creates) the log in `dir`, returns the calls accepted and not finished
    /// before (in acceptance order), rewrites the log with only those, and starts the
    /// writer thread.
    pub fn open(dir: &Path) -> Result<(CallStore, Vec<StoredCall>), StoreError> {
        let path = dir.join("calls.log");
        let io_err = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let (pending, dropped) = read_log(&path).map_err(io_err)?;
        if dropped > 0 {
            tracing::warn!(
                "async queue {}: {dropped} byte(s) of a torn last record dropped (a crash mid-write; that call was never answered 202)",
                path.display()
            );
        }
        let live: HashMap<u64, Bytes> = pending.iter().map(|c| (c.id, c.encode())).collect();
        let retries: HashMap<u64, Bytes> = pending
            .iter()
            .filter(|c| c.attempts > 0)
            .map(|c| (c.id, attempt_record(c.id, c.attempts, c.retry_at_ms)))
            .collect();
        let file = rewrite(
            &path,
            pending
                .iter()
                .flat_map(|c| std::iter::once(&live[&c.id]).chain(retries.get(&c.id))),
        )
        .map_err(io_err)?;
        // Held from the live records, not from the whole old log (dead records included).
        let pending: Vec<StoredCall> = pending
            .iter()
            .filter_map(|c| {
                let mut shared = StoredCall::from_record(&live[&c.id])?;
                shared.attempts = c.attempts;
                shared.retry_at_ms = c.retry_at_ms;
                Some(shared)
            })
            .collect();
        let size = file.metadata().map_err(io_err)?.len();
        let (tx, rx) = mpsc::channel();
        let syncs = Arc::new(AtomicU64::new(0));
        let writer = Writer {
            syncs: syncs.clone(),
            path: path.clone(),
            file,
            size,
            torn: false,
            live_bytes: live.values().map(|r| r.len() as u64).sum(),
            live,
            retries,
            len: 0,
        };
        std::thread::Builder::new()
            .name("synwake-async-log".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err)?;
        Ok((CallStore { tx, path, syncs }, pending))
    }

    /// Appends the call and returns once it is on disk (fsync'd), as a call whose body
    /// and headers share the record's memory (one copy in memory per queued call).
    pub async fn append(&self, call: &StoredCall) -> Result<StoredCall, StoreError> {
        let (done, wait) = tokio::sync::oneshot::channel();
        let record = call.encode();
        let shared = StoredCall::from_record(&record).unwrap_or_else(|| call.clone());
        self.tx
            .send(Op::Append {
                id: call.id,
                record,
                done,
            })
            .map_err(|_| StoreError::Stopped)?;
        match wait.await {
            Ok(Ok(())) => Ok(shared),
            Ok(Err(source)) => Err(StoreError::Io {
                path: self.path.clone(),
                source,
            }),
            Err(_) => Err(StoreError::Stopped),
        }
    }

    /// Group writes (one fdatasync each) since the start.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Marks a call finished; written with the next group (a crash before that runs the
    /// call again: at least once).
    pub fn done(&self, id: u64) {
        let _ = self.tx.send(Op::Done(id));
    }

    /// Records that the call failed `attempts` times and is retried at `retry_at_ms`;
    /// written at once (not waited for: a crash before it repeats one attempt's backoff).
    pub fn attempt(&self, id: u64, attempts: u32, retry_at_ms: u64) {
        let _ = self.tx.send(Op::Attempt {
            id,
            attempts,
            retry_at_ms,
        });
    }
}

struct Writer {
    syncs: Arc<AtomicU64>,
    path: PathBuf,
    file: File,
    /// Encoded `accept` records of the calls not done, for rewriting the log.
    live: HashMap<u64, Bytes>,
    /// The latest `attempt` record of the live calls that failed at least once.
    retries: HashMap<u64, Bytes>,
    /// Bytes appended since the last rewrite (the rewritten part is live data).
    len: u64,
    /// Bytes of the records in `live`.
    live_bytes: u64,
    /// File size after the last complete write: a failed write is cut back to it, so
    /// that no later record follows a partial one.
    size: u64,
    /// A failed write could not be cut back: nothing is appended until it is.
    torn: bool,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        while let Ok(first) = rx.recv() {
            let mut waiters = Vec::new();
            let mut next = Some(first);
            while let Some(op) = next.take() {
                match op {
                    Op::Append { id, record, done } => {
                        buf.extend_from_slice(&record);
                        self.live_bytes += record.len() as u64;
                        self.live.insert(id, record);
                        waiters.push((id, done));
                    }
                    Op::Done(id) => {
                        if let Some(r) = self.live.remove(&id) {
                            self.live_bytes -= r.len() as u64;
                            buf.extend_from_slice(&done_record(id));
                        }
                        self.retries.remove(&id);
                    }
                    Op::Attempt {
                        id,
                        attempts,
                        retry_at_ms,
                    } => {
                        if self.live.contains_key(&id) {
                            let r = attempt_record(id, attempts, retry_at_ms);
                            buf.extend_from_slice(&r);
                            self.retries.insert(id, r);
                        }
                    }
                }
                if buf.len() < GROUP_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if self.torn && self.file.set_len(self.size).is_ok() {
                self.torn = false;
            }
            let written = if self.torn {
                Err(io::Error::other(
                    "the log's end could not be repaired after a failed write",
                ))
            } else {
                self.file
                    .write_all(&buf)
                    .and_then(|_| self.file.sync_data())
            };
            match &written {
                Ok(()) => {
                    self.syncs.fetch_add(1, Ordering::Relaxed);
                    self.size += buf.len() as u64;
                    self.len += buf.len() as u64;
                }
                Err(_) => self.torn = self.file.set_len(self.size).is_err(),
            }
            buf.clear();
            if let Err(e) = &written {
                // Not kept: those calls get an error instead of a 202.
                for (id, _) in &waiters {
                    if let Some(r) = self.live.remove(id) {
                        self.live_bytes -= r.len() as u64;
                    }
                }
                tracing::error!("async queue {}: {e}", self.path.display());
            }
            for (_, done) in waiters {
                let _ = done.send(match &written {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                });
            }
            if self.len > COMPACT_AT.max(2 * self.live_bytes) {
                self.compact();
            }
        }
    }

    /// Rewrites the log with the live calls only.
    fn compact(&mut self) {
        let mut ids: Vec<u64> = self.live.keys().copied().collect();
        ids.sort_unstable();
        let records = ids
            .iter()
            .flat_map(|id| std::iter::once(&self.live[id]).chain(self.retries.get(id)));
        match rewrite(&self.path, records) {
            Ok(f) => {
                self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                self.file = f;
                self.len = 0;
                self.torn = false;
            }
            Err(e) => tracing::error!("async queue {}: rewrite failed: {e}", self.path.display()),
        }
    }
}

/// Writes `records` to a temp file, fsyncs, renames it over `path`, and opens it for
/// appending.
fn rewrite<'a>(path: &Path, records: impl Iterator<Item = &'a Bytes>) -> io::Result<File> {
    let tmp = path.with_extension("log.tmp.compact");
    let written = (|| {
        let mut f = File::create(&tmp)?;
        let mut w = io::BufWriter::with_capacity(1 << 20, &mut f);
        for r in records {
            w.write_all(r)?;
        }
        w.flush()?;
        drop(w);
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent() {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    OpenOptions::new().append(true).open(path)
}

/// The calls accepted and not done, in id order, and how many bytes of a torn tail were
/// ignored.
fn read_log(path: &Path) -> io::Result<(Vec<StoredCall>, usize)> {
    let mut data = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut data)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    }
    let data = Bytes::from(data);
    let mut calls: HashMap<u64, StoredCall> = HashMap::new();
    let mut at = 0;
    while at + 8 <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap());
        let end = at + 8 + len;
        if len == 0 || end > data.len() || crc32fast::hash(&data[at + 8..end]) != crc {
            break;
        }
        let payload = data.slice(at + 8..end);
        match payload[0] {
            ACCEPT => {
                if let Some(c) = StoredCall::decode(&payload) {
                    calls.insert(c.id, c);
                }
            }
            DONE if payload.len() == 9 => {
                let id = u64::from_le_bytes(payload[1..9].try_into().unwrap());
                calls.remove(&id);
            }
            ATTEMPT if payload.len() == 21 => {
                let id = u64::from_le_bytes(payload[1..9].try_into().unwrap());
                if let Some(c) = calls.get_mut(&id) {
                    c.attempts = u32::from_le_bytes(payload[9..13].try_into().unwrap());
                    c.retry_at_ms = u64::from_le_bytes(payload[13..21].try_into().unwrap());
                }
            }
            _ => {}
        }
        at = end;
    }
    let mut pending: Vec<StoredCall> = calls.into_values().collect();
    pending.sort_by_key(|c| c.id);
    Ok((pending, data.len() - at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: u64) -> StoredCall {
        StoredCall {
            id,
            accepted_ms: 1_700_000_000_000 + id,
            function: "f".into(),
            method: "POST".into(),
            path: "/x?y=1".into(),
            callback: id.is_multiple_of(2).then(|| "http://127.0.0.1:9/cb".into()),
            headers: vec![("content-type".into(), Bytes::from_static(b"text/plain"))],
            body: Bytes::from(vec![id as u8; 1024]),
            attempts: 0,
            retry_at_ms: 0,
        }
    }

    #[tokio::test]
    async fn accepted_and_not_done_calls_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (store, pending) = CallStore::open(dir.path()).unwrap();
        assert!(pending.is_empty());
        for id in 1..=5 {
            store.append(&call(id)).await.unwrap();
        }
        store.done(2);
        store.done(4);
        store.append(&call(6)).await.unwrap(); // flushes the done records with it
        drop(store);
        let (_s, pending) = CallStore::open(dir.path()).unwrap();
        let ids: Vec<u64> = pending.iter().map(|c| c.id).collect();
        assert_eq!(ids, [1, 3, 5, 6]);
        assert_eq!(pending[1], call(3));
    }

    #[tokio::test]
    async fn attempt_counts_survive_a_restart_and_a_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CallStore::open(dir.path()).unwrap();
        for id in 1..=3 {
            store.append(&call(id)).await.unwrap();
        }
        store.attempt(1, 1, 111);
        store.attempt(1, 2, 222);
        store.attempt(3, 1, 333);
        store.done(3);
        store.append(&call(4)).await.unwrap(); // the records before it are on disk
        drop(store);
        // The first open rewrites the log (a compaction); the second reads that rewrite.
        for _ in 0..2 {
            let (_s, pending) = CallStore::open(dir.path()).unwrap();
            let got: Vec<(u64, u32, u64)> = pending
                .iter()
                .map(|c| (c.id, c.attempts, c.retry_at_ms))
                .collect();
            assert_eq!(got, [(1, 2, 222), (2, 0, 0), (4, 0, 0)]);
        }
    }

    #[tokio::test]
    async fn torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CallStore::open(dir.path()).unwrap();
        store.append(&call(1)).await.unwrap();
        store.append(&call(2)).await.unwrap();
        drop(store);
        let path = dir.path().join("calls.log");
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 100).unwrap();
        let (store, pending) = CallStore::open(dir.path()).unwrap();
        assert_eq!(pending.iter().map(|c| c.id).collect::<Vec<_>>(), [1]);
        // The log was rewritten: new appends follow a clean record.
        store.append(&call(3)).await.unwrap();
        drop(store);
        let (_s, pending) = CallStore::open(dir.path()).unwrap();
        assert_eq!(pending.iter().map(|c| c.id).collect::<Vec<_>>(), [1, 3]);
    }
}
