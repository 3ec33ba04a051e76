//! Function output: every line an instance prints goes to synwake's log (prefixed with the
//! function name) and into a bounded per-function buffer served by `GET /system/logs`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::broadcast;

/// Lines kept per function.
pub const LINES_PER_FUNCTION: usize = 2000;

/// One line of function output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogLine {
    pub name: String,
    pub instance: String,
    #[serde(skip)]
    pub time: SystemTime,
    pub text: String,
    /// "stdout" or "stderr".
    #[serde(skip)]
    pub stream: &'static str,
}

/// Recent output of every function, plus a live feed for followers.
pub struct LogStore {
    buffers: Mutex<HashMap<String, VecDeque<LogLine>>>,
    live: broadcast::Sender<LogLine>,
}

impl Default for LogStore {
    fn default() -> Self {
        Self::new()
    }
}

impl LogStore {
    pub fn new() -> Self {
        LogStore {
            buffers: Mutex::new(HashMap::new()),
            live: broadcast::channel(4096).0,
        }
    }

    /// Records a line and echoes it to synwake's own log.
    pub fn push(&self, function: &str, instance: &str, stream: &'static str, text: String) {
        tracing::info!(target: "function", "[{function}/{instance}] {stream}: {text}");
        let line = LogLine {
            name: function.to_string(),
            instance: instance.to_string(),
            time: SystemTime::now(),
            text,
            stream,
        };
        let mut map = self.buffers.lock().unwrap();
        let buf = map.entry(function.to_string()).or_default();
        if buf.len() == LINES_PER_FUNCTION {
            buf.pop_front();
        }
        buf.push_back(line.clone());
        drop(map);
        let _ = self.live.send(line);
    }

    /// Buffered lines of `function`, oldest first.
    pub fn recent(&self, function: &str) -> Vec<LogLine> {
        self.buffers
            .lock()
            .unwrap()
            .get(function)
            .map(|b| b.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Last `n` lines of one instance (for start-failure messages).
    pub fn tail_of_instance(&self, function: &str, instance: &str, n: usize) -> Vec<String> {
        let map = self.buffers.lock().unwrap();
        let Some(buf) = map.get(function) else {
            return Vec::new();
        };
        let mut lines: Vec<String> = buf
            .iter()
            .rev()
            .filter(|l| l.instance == instance)
            .take(n)
            .map(|l| l.text.clone())
            .collect();
        lines.reverse();
        lines
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LogLine> {
        self.live.subscribe()
    }

    pub fn forget(&self, function: &str) {
        self.buffers.lock().unwrap().remove(function);
    }
}

/// Where one instance writes its output.
#[derive(Clone)]
pub struct OutputSink {
    pub store: Arc<LogStore>,
    pub function: String,
    pub instance: String,
}

impl OutputSink {
    pub fn line(&self, stream: &'static str, text: String) {
        self.store
            .push(&self.function, &self.instance, stream, text);
    }

    pub fn tail(&self, n: usize) -> Vec<String> {
        self.store
            .tail_of_instance(&self.function, &self.instance, n)
    }
}
