//! HTTP/2 and gRPC through the gateway, with real clients: curl with prior knowledge,
//! h2load, and a Python grpcio client calling a cold h2c function (unary, bidi streaming,
//! an error status carried in trailers); WebSocket with Python websockets (HTTP/1.1 Upgrade)
//! and python3-h2 (RFC 8441 extended CONNECT); shutdown draining an open WebSocket.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Debian's python3 when it can import `module` (the gate's rule otherwise).
fn python_with(module: &str) -> Option<&'static str> {
    let deb = match module {
        "grpc" => "python3-grpcio".to_string(),
        other => format!("python3-{other}"),
    };
    gate::python_with("protocols", module, &deb)
}

fn tool(name: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is missing (scripts/deps.sh installs it)"
        );
        eprintln!("SKIPPED: {name} is not installed");
    }
    ok
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn curl_http2_prior_knowledge_next_to_http1_on_the_same_port() {
    if !tool("curl") {
        return;
    }
    let d = Daemon::start(&function("f", ""));
    let url = format!("http://127.0.0.1:{}/function/f/pid", d.shared);
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2-prior-knowledge",
            "-w",
            "\n%{http_version}",
            &url,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let pid: i32 = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .parse()
        .expect(&text);
    assert_eq!(text.lines().last(), Some("2"), "not HTTP/2: {text}");
    // Same port, HTTP/1.1, same instance.
    assert_eq!(d.call("f", "/pid").pid(), pid);
    // An HTTP/2 upload streams through to an HTTP/1.1 function intact.
    let body = "x".repeat(300_000);
    let out = Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "--data-binary", "@-"])
        .arg(format!("http://127.0.0.1:{}/function/f/", d.shared))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(body.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(out.stdout.len(), body.len());
}

#[test]
fn h2load_many_streams_on_few_connections() {
    if !tool("h2load") {
        return;
    }
    let d = Daemon::start(&function("f", ""));
    assert_eq!(d.call("f", "/pid").status, 200);
    let out = Command::new("h2load")
        .args(["-n", "2000", "-c", "4", "-m", "16"])
        .arg(format!("http://127.0.0.1:{}/function/f/", d.shared))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "h2load:\n{text}"
    );
    assert!(text.contains("status codes: 2000 2xx"), "h2load:\n{text}");
}

const GRPC_CLIENT: &str = r#"
import sys, grpc
ch = grpc.insecure_channel(sys.argv[1])
grpc.channel_ready_future(ch).result(timeout=30)
unary = ch.unary_unary("/test.Echo/Unary")
resp, call = unary.with_call(b"hello", timeout=30)
trailers = dict(call.trailing_metadata())
print("unary", resp.decode(), trailers.get("x-echo-trailer"))
stream = ch.stream_stream("/test.Echo/Stream")
print("stream", ",".join(r.decode() for r in stream(iter([b"a", b"bb", b"ccc"]), timeout=30)))
try:
    ch.unary_unary("/test.Echo/Fail")(b"x", timeout=30)
    print("fail none")
except grpc.RpcError as e:
    print("fail", e.code().name, e.details())
"#;

#[test]
fn grpc_unary_and_streaming_to_a_cold_h2c_function() {
    let Some(py) = python_with("grpc") else {
        return;
    };
    let port = free_port();
    let d = Daemon::start(&format!(
        "[[function]]\nname = \"grpc\"\nport = {port}\ncommand = [{py:?}, {:?}]\nprotocol = \"h2c\"\n",
        fixture("grpc_echo.py").display().to_string()
    ));
    assert_eq!(d.available("grpc"), 0, "the function starts cold");
    let t0 = Instant::now();
    let out = Command::new(py)
        .args(["-c", GRPC_CLIENT, &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed after {:?}: {text}\n{}",
        t0.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("unary olleh unary"), "{text}");
    assert!(text.contains("stream A,BB,CCC"), "{text}");
    assert!(text.contains("fail NOT_FOUND nope"), "{text}");
    let m = d.metrics();
    assert_eq!(
        metric(
            &m,
            "synwake_cold_starts_total{function=\"grpc\",trigger=\"request\"}"
        )
        .or_else(|| metric(
            &m,
            "synwake_cold_starts_total{function=\"grpc\",trigger=\"accept\"}"
        )),
        Some(1.0),
        "{m}"
    );
    assert_eq!(d.available("grpc"), 1);
}

const WS_CLIENT: &str = r#"
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1], open_timeout=30) as ws:
        await ws.send("hello")
        print(await ws.recv(), flush=True)
        await asyncio.sleep(float(sys.argv[2]))
        await ws.send("again")
        print(await ws.recv(), flush=True)
asyncio.run(main())
"#;

#[test]
fn websocket_to_a_cold_function_holds_it_past_idle_timeout_until_closed() {
    let Some(py) = python_with("websockets") else {
        return;
    };
    let d = Daemon::start(&format!(
        "[[function]]\nname = \"ws\"\ncommand = [{py:?}, {:?}]\nidle_timeout = \"1s\"\n",
        fixture("ws_echo.py").display().to_string()
    ));
    assert_eq!(d.available("ws"), 0, "the function starts cold");
    let url = format!("ws://127.0.0.1:{}/function/ws/", d.shared);
    // Open for 3 s, three times idle_timeout, with no message in between.
    let client = Command::new(py)
        .args(["-c", WS_CLIENT, &url, "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    socket_keeps_its_instance_up(&d, client, "echo hello\necho again\n");
}

/// A `[[function]]` running the Python fixture `script`; `extra` is more TOML lines.
fn py_function(py: &str, name: &str, script: &str, extra: &str) -> String {
    format!(
        "[[function]]\nname = {name:?}\ncommand = [{py:?}, {:?}]\n{extra}\n",
        fixture(script).display().to_string()
    )
}

/// The `[[function]]` of the Python WebSocket echo function.
fn ws_function(py: &str, idle_timeout: &str) -> String {
    let extra = format!("idle_timeout = {idle_timeout:?}");
    py_function(py, "ws", "ws_echo.py", &extra)
}

/// RFC 8441: an HTTP/2 client's extended CONNECT reaches the (HTTP/1.1) WebSocket function
/// as an Upgrade handshake, both directions work, and the open stream holds the instance
/// past `idle_timeout` like an HTTP/1.1 WebSocket.
#[test]
fn websocket_over_http2_extended_connect_to_a_cold_function() {
    let Some(py) = python_with("h2") else {
        return;
    };
    if python_with("websockets").is_none() {
        return;
    }
    let d = Daemon::start(&ws_function(py, "1s"));
    assert_eq!(d.available("ws"), 0, "the function starts cold");
    let client = ws_h2_client(py, d.shared, "/function/ws/", 3, &["hello", "again"])
        .spawn()
        .unwrap();
    socket_keeps_its_instance_up(&d, client, "status 200\necho hello\necho again\n");
}

/// The python3-h2 RFC 8441 client (tests/fixtures/ws_h2_client.py) for `path` on
/// synwake's `port`: sends the first of `msgs`, waits `hold` seconds, sends the rest;
/// stdout and stderr piped.
fn ws_h2_client(py: &str, port: u16, path: &str, hold: u32, msgs: &[&str]) -> Command {
    let mut c = Command::new(py);
    c.arg(fixture("ws_h2_client.py"))
        .args(["127.0.0.1", &port.to_string(), path, &hold.to_string()])
        .args(msgs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// The `[[function]]` of the python3-h2 WebSocket function (h2c, RFC 8441); `extra` is
/// more TOML lines.
fn ws_h2c_function(py: &str, name: &str, extra: &str) -> String {
    let extra = format!("protocol = \"h2c\"\n{extra}");
    py_function(py, name, "ws_h2_server.py", &extra)
}

/// RFC 8441 end to end over HTTP/2: an HTTP/2 client's extended CONNECT reaches a cold
/// h2c function as an extended CONNECT on its HTTP/2 connection; messages go both ways,
/// the function sees the forwarded headers, the open stream holds the instance past
/// `idle_timeout` (and its connection past `upstream_idle_timeout`), and it is counted like
/// any request.
#[test]
fn websocket_over_http2_to_a_cold_h2c_function() {
    let Some(py) = python_with("h2") else {
        return;
    };
    // The stream outlives upstream_idle_timeout too (synwake lets go of the connection,
    // which stays open for its stream).
    let d = Daemon::start_with(
        "upstream_idle_timeout = \"500ms\"",
        &ws_h2c_function(py, "ws", "idle_timeout = \"1s\""),
    );
    assert_eq!(d.available("ws"), 0, "the function starts cold");
    let msgs = [
        "hello",
        "again",
        "header:x-forwarded-for",
        "header:x-forwarded-proto",
    ];
    let client = ws_h2_client(py, d.shared, "/function/ws/", 3, &msgs)
        .spawn()
        .unwrap();
    socket_keeps_its_instance_up(
        &d,
        client,
        "status 200\necho hello\necho again\necho 127.0.0.1\necho http\n",
    );
    let m = d.metrics();
    assert_eq!(
        metric(
            &m,
            "synwake_function_invocations_total{function=\"ws\",code=\"200\"}"
        ),
        Some(1.0),
        "{m}"
    );
    // Ordinary requests to the function go on HTTP/2 too, and start it again; the
    // client's host is the `:authority`, with no Host beside it.
    let r = d.call("ws", "/pid");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.instance_pids(), vec![r.pid()]);
    let r = d.call("ws", "/authority");
    assert_eq!(r.text(), format!("127.0.0.1:{} host=None", d.shared));
}

/// Requests to an h2c function are streams on one HTTP/2 connection per instance and
/// serving thread, which synwake lets go of (and so closes) after `upstream_idle_timeout`
/// without a request.
#[test]
fn h2c_requests_share_one_connection_until_upstream_idle_timeout() {
    let Some(py) = python_with("h2") else {
        return;
    };
    let d = Daemon::start_with(
        "serving_threads = 1\nupstream_idle_timeout = \"500ms\"",
        &ws_h2c_function(py, "f", "idle_timeout = \"60s\""),
    );
    let pid = d.call("f", "/pid").pid();
    for _ in 0..20 {
        assert_eq!(d.call("f", "/pid").pid(), pid);
    }
    // Accepted, open: the readiness check's connect, then one for 21 requests.
    let first = d.call("f", "/connections").text();
    std::thread::sleep(Duration::from_millis(2000));
    let later = d.call("f", "/connections").text();
    let counts = |t: &str| -> Vec<u32> { t.split(' ').map(|n| n.parse().unwrap()).collect() };
    let (first, later) = (counts(&first), counts(&later));
    assert_eq!(first[1], 1, "open connections after 22 requests: {first:?}");
    assert_eq!(
        (later[0], later[1]),
        (first[0] + 1, 1),
        "after upstream_idle_timeout the old connection is closed and a new one made"
    );
}

/// An HTTP/1.1 WebSocket client (Python websockets, which checks Sec-WebSocket-Accept)
/// reaches a cold h2c function too: synwake sends the handshake on as an RFC 8441 extended
/// CONNECT and answers the client's 101 itself; the socket holds the instance past
/// `idle_timeout`. An h2c function without extended CONNECT refuses it with 501.
#[test]
fn websocket_over_http1_to_a_cold_h2c_function() {
    let Some(py) = python_with("h2") else {
        return;
    };
    if python_with("websockets").is_none() {
        return;
    }
    let plain = ws_h2c_function(py, "plain", "env = { WS_H2_EXTENDED_CONNECT = \"0\" }");
    let d = Daemon::start(&(ws_h2c_function(py, "ws", "idle_timeout = \"1s\"") + &plain));
    assert_eq!(d.available("ws"), 0, "the function starts cold");
    let refused = Command::new(py)
        .args(["-c", WS_CLIENT])
        .arg(format!("ws://127.0.0.1:{}/function/plain/", d.shared))
        .arg("0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("HTTP 501"), "{err}");
    let client = Command::new(py)
        .args(["-c", WS_CLIENT])
        .arg(format!("ws://127.0.0.1:{}/function/ws/", d.shared))
        .arg("3")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    socket_keeps_its_instance_up(&d, client, "echo hello\necho again\n");
}

/// An h2c function that did not enable the extended CONNECT protocol gets no extended
/// CONNECT (RFC 8441 section 3 forbids sending it): the client is answered 501 at once,
/// cold or warm, and the function's connection keeps serving other requests.
#[test]
fn websocket_over_http2_to_an_h2c_function_without_extended_connect_gets_501() {
    let Some(py) = python_with("h2") else {
        return;
    };
    let d = Daemon::start(&ws_h2c_function(
        py,
        "plain",
        "env = { WS_H2_EXTENDED_CONNECT = \"0\" }",
    ));
    let attempt = || {
        let t0 = Instant::now();
        let out = ws_h2_client(py, d.shared, "/function/plain/", 0, &["hello"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "status 501\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success());
        t0.elapsed()
    };
    let cold = attempt();
    let warm = attempt();
    // The client gives up after 30 s: an answer well before it is no hang.
    assert!(
        cold < Duration::from_secs(15),
        "cold: answered after {cold:?}"
    );
    // A python3 client took 6 s once in a loaded CI run (140-260 ms here); a hang is 30 s.
    assert!(
        warm < Duration::from_secs(15),
        "warm: answered after {warm:?}"
    );
    let pid = d.call("plain", "/pid");
    assert_eq!(pid.status, 200, "{}", pid.text());
    assert_eq!(
        d.instance_pids(),
        vec![pid.pid()],
        "one instance throughout"
    );
    let m = d.metrics();
    assert_eq!(
        metric(
            &m,
            "synwake_function_invocations_total{function=\"plain\",code=\"501\"}"
        ),
        Some(2.0),
        "{m}"
    );
}

/// SIGTERM with a WebSocket over HTTP/2 open to an h2c function: synwake waits
/// `drain_timeout` for it (the tunnel counts as in use), then closes it and stops the
/// instance.
#[test]
fn shutdown_closes_an_h2c_websocket_still_open_after_drain_timeout() {
    let Some(py) = python_with("h2") else {
        return;
    };
    let mut d = Daemon::start_with(
        "drain_timeout = \"2s\"",
        &ws_h2c_function(py, "ws", "idle_timeout = \"60s\""),
    );
    // Says hello, then holds the stream open for 60 s.
    let mut client = ws_h2_client(py, d.shared, "/function/ws/", 60, &["hello", "again"])
        .spawn()
        .unwrap();
    use std::io::BufRead;
    let mut out = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut seen = String::new();
    for _ in 0..2 {
        out.read_line(&mut seen).unwrap();
    }
    assert_eq!(seen, "status 200\necho hello\n");
    let instance = d.instance_pids();
    assert_eq!(instance.len(), 1);
    exits_at_drain_timeout(&mut d);
    assert!(!alive(instance[0]), "the instance outlived synwake");
    let _ = client.kill();
    let _ = client.wait();
}

/// SIGTERM to `d` (drain_timeout 2 s) with a WebSocket open: synwake exits with success,
/// no earlier than drain_timeout.
fn exits_at_drain_timeout(d: &mut Daemon) {
    let term = Instant::now();
    signal(d.pid(), libc::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(30)).expect("synwake exits");
    let took = term.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took >= Duration::from_millis(1900),
        "exited after {took:?}, before drain_timeout (2 s), under an open WebSocket"
    );
}

/// `client` holds a WebSocket to the cold function `ws` open for 3 s (idle_timeout is
/// 1 s): the instance starts, stays up under the open socket, one instance answers
/// throughout, the client prints `expected`, and the instance stops once it closed.
fn socket_keeps_its_instance_up(d: &Daemon, client: std::process::Child, expected: &str) {
    assert!(
        wait_until(Duration::from_secs(30), || d.available("ws") == 1),
        "never started"
    );
    let pid = d.instance_pids();
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        d.available("ws"),
        1,
        "stopped by idle_timeout under an open WebSocket"
    );
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text, expected);
    assert_eq!(
        d.instance_pids(),
        pid,
        "the same instance answered throughout"
    );
    // Closed: the instance is idle now and stops after idle_timeout.
    assert!(
        wait_until(Duration::from_secs(10), || d.available("ws") == 0),
        "still running 10 s after the WebSocket closed"
    );
}

/// Says hello, then on "more" (a line on stdin) says again and closes; on "hold" waits
/// until synwake closes the socket and prints "closed".
const WS_DRAIN_CLIENT: &str = r#"
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1], open_timeout=30) as ws:
        await ws.send("hello")
        print(await ws.recv(), flush=True)
        if sys.argv[2] == "more":
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await ws.send("again")
            print(await ws.recv(), flush=True)
            return
        try:
            await ws.recv()
        except websockets.ConnectionClosed:
            print("closed", flush=True)
asyncio.run(main())
"#;

fn ws_drain_client(py: &str, d: &Daemon, mode: &str) -> std::process::Child {
    Command::new(py)
        .args([
            "-c",
            WS_DRAIN_CLIENT,
            &format!("ws://127.0.0.1:{}/function/ws/", d.shared),
            mode,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn read_line(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    let out = child.stdout.as_mut().unwrap();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    line
}

/// SIGTERM with a WebSocket open: synwake keeps it working while it drains, and exits as
/// soon as it closes, well before `drain_timeout`.
#[test]
fn shutdown_drains_an_open_websocket_until_it_closes() {
    let Some(py) = python_with("websockets") else {
        return;
    };
    let mut d = Daemon::start_with("drain_timeout = \"60s\"", &ws_function(py, "60s"));
    let mut client = ws_drain_client(py, &d, "more");
    assert_eq!(read_line(&mut client), "echo hello\n");
    let instance = d.instance_pids();
    assert_eq!(instance.len(), 1);
    let term = Instant::now();
    signal(d.pid(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(alive(d.pid()), "synwake exited under an open WebSocket");
    use std::io::Write;
    client.stdin.as_mut().unwrap().write_all(b"more\n").unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "echo again\n");
    let status = d.wait_exit(Duration::from_secs(40)).expect("synwake exits");
    let took = term.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(40),
        "took {took:?}: waited for drain_timeout (60 s) instead of the WebSocket's close"
    );
    assert!(!alive(instance[0]), "the instance outlived synwake");
}

/// A WebSocket still open at `drain_timeout` is closed then: synwake waits that long for
/// it, no longer, and stops the instance.
#[test]
fn shutdown_closes_a_websocket_still_open_after_drain_timeout() {
    let Some(py) = python_with("websockets") else {
        return;
    };
    let mut d = Daemon::start_with("drain_timeout = \"2s\"", &ws_function(py, "60s"));
    let mut client = ws_drain_client(py, &d, "hold");
    assert_eq!(read_line(&mut client), "echo hello\n");
    let instance = d.instance_pids();
    exits_at_drain_timeout(&mut d);
    let out = client.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "closed\n");
    assert!(!alive(instance[0]), "the instance outlived synwake");
}

/// RFC 8441 the way browsers use it: `h2` by ALPN on the TLS port, then an extended
/// CONNECT to the WebSocket function.
#[test]
fn websocket_over_http2_over_tls() {
    let Some(py) = python_with("h2") else {
        return;
    };
    if python_with("websockets").is_none() || !tool("openssl") {
        return;
    }
    let pki = tempfile::tempdir().unwrap();
    let (cert, key) = (pki.path().join("cert.pem"), pki.path().join("key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "1"])
        .args([
            "-subj",
            "/CN=ws.test",
            "-addext",
            "subjectAltName=DNS:ws.test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let tls_port = free_port();
    let d = Daemon::start_with(
        &format!("tls_listen = \"127.0.0.1:{tls_port}\""),
        &format!(
            "[[certificate]]\ncert = {:?}\nkey = {:?}\n\n{}",
            cert.display().to_string(),
            key.display().to_string(),
            ws_function(py, "60s")
        ),
    );
    let out = ws_h2_client(py, tls_port, "/function/ws/", 0, &["hello", "again"])
        .env("WS_TLS_CA", &cert)
        .env("WS_TLS_NAME", "ws.test")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text, "status 200\necho hello\necho again\n");
    assert_eq!(d.available("ws"), 1);
}
