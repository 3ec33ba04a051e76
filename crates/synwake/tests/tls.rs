//! The HTTPS edge against the real binary with real TLS clients (curl, openssl s_client,
//! Python's ssl module): certificates picked by SNI, host routing, the `sni` wake before
//! the handshake completes, reloads with a connection open across them, and the bad
//! input an edge must shrug off. Certificates are made here with the openssl CLI.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::gate::{can_run, missing_tool};
use common::*;

const PY: &str = "/usr/bin/python3";

/// False (with the CI rule applied) when a client this file uses is missing.
fn tools(test: &str) -> bool {
    can_run(
        test,
        missing_tool(&[("openssl", "version"), ("curl", "--version"), (PY, "-V")]),
    )
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A test CA and the leaf certificates it signs, in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        run(Command::new("openssl").current_dir(d).args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=synwake test CA",
        ]));
        Pki { dir }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Issues `<stem>.pem` (leaf then CA) and `<stem>.key` (0600) for `sans`; `serial`
    /// tells versions of one certificate apart.
    fn issue(&self, stem: &str, sans: &[&str], serial: u32) -> (PathBuf, PathBuf) {
        let d = self.dir.path();
        let san = sans
            .iter()
            .map(|s| format!("DNS:{s}"))
            .collect::<Vec<_>>()
            .join(",");
        std::fs::write(
            d.join(format!("{stem}.ext")),
            format!("subjectAltName={san}\n"),
        )
        .unwrap();
        run(Command::new("openssl").current_dir(d).args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{stem}.new.key"),
            "-out",
            &format!("{stem}.csr"),
            "-subj",
            &format!("/CN={}", sans[0]),
        ]));
        run(Command::new("openssl").current_dir(d).args([
            "x509",
            "-req",
            "-in",
            &format!("{stem}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            &serial.to_string(),
            "-days",
            "2",
            "-extfile",
            &format!("{stem}.ext"),
            "-out",
            &format!("{stem}.leaf.pem"),
        ]));
        let mut chain = std::fs::read(d.join(format!("{stem}.leaf.pem"))).unwrap();
        chain.extend(std::fs::read(d.join("ca.pem")).unwrap());
        let (cert, key) = (d.join(format!("{stem}.pem")), d.join(format!("{stem}.key")));
        set_mode(&d.join(format!("{stem}.new.key")), 0o600);
        // Replace by rename, as certbot does: a reader never sees half a file.
        std::fs::write(d.join(format!("{stem}.pem.tmp")), chain).unwrap();
        std::fs::rename(d.join(format!("{stem}.pem.tmp")), &cert).unwrap();
        std::fs::rename(d.join(format!("{stem}.new.key")), &key).unwrap();
        (cert, key)
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn cert_table(cert: &Path, key: &Path, default: bool) -> String {
    format!(
        "[[certificate]]\ncert = {:?}\nkey = {:?}\ndefault = {default}\n",
        cert.display().to_string(),
        key.display().to_string()
    )
}

/// `[gateway]` lines for a TLS port; returns them and the port.
fn tls_gateway(extra: &str) -> (String, u16) {
    let port = free_port();
    (format!("tls_listen = \"127.0.0.1:{port}\"\n{extra}"), port)
}

/// What `openssl s_client` is served: (SAN line, serial), or the error output.
fn served(port: u16, servername: Option<&str>) -> Result<(String, String), String> {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")]);
    match servername {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd.stdin(Stdio::null()).output().expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let Some(start) = text.find("-----BEGIN CERTIFICATE-----") else {
        return Err(format!("{}{}", text, String::from_utf8_lossy(&out.stderr)));
    };
    let end = text.find("-----END CERTIFICATE-----").expect("PEM end") + 25;
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-ext", "subjectAltName"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    x509.stdin
        .take()
        .unwrap()
        .write_all(&text.as_bytes()[start..end])
        .unwrap();
    let out = x509.wait_with_output().unwrap();
    let info = String::from_utf8_lossy(&out.stdout).to_string();
    let serial = info
        .lines()
        .find_map(|l| l.strip_prefix("serial="))
        .unwrap_or("")
        .to_string();
    let san = info
        .lines()
        .find(|l| l.contains("DNS:"))
        .unwrap_or("")
        .trim()
        .to_string();
    Ok((san, serial))
}

/// curl over HTTPS to `host` (resolved to 127.0.0.1), verifying against `ca`.
fn curl(ca: &Path, tls_version: &str, host: &str, port: u16, path: &str) -> (String, String) {
    let out = run(Command::new("curl").args([
        "-sS",
        tls_version,
        "--cacert",
        &ca.display().to_string(),
        "--resolve",
        &format!("{host}:{port}:127.0.0.1"),
        "-w",
        "\n%{http_code} %{ssl_verify_result}",
        &format!("https://{host}:{port}{path}"),
    ]));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, tail) = text.rsplit_once('\n').unwrap();
    (body.trim_end_matches('\n').to_string(), tail.to_string())
}

#[test]
fn sni_picks_the_certificate_by_san_and_no_sni_gets_the_default() {
    if !tools("sni_picks_the_certificate_by_san_and_no_sni_gets_the_default") {
        return;
    }
    let pki = Pki::new();
    let (a_cert, a_key) = pki.issue("a", &["a.test", "*.wild.test"], 11);
    let (b_cert, b_key) = pki.issue("b", &["b.test"], 22);
    let (gw, port) = tls_gateway("");
    let d = Daemon::start_with(
        &gw,
        &format!(
            "{}{}{}",
            cert_table(&a_cert, &a_key, false),
            cert_table(&b_cert, &b_key, true),
            function("f", "hosts = [\"a.test\", \"b.test\", \"*.wild.test\"]")
        ),
    );
    let (san, serial) = served(port, Some("a.test")).unwrap();
    assert!(san.contains("DNS:a.test"), "{san}");
    assert_eq!(serial, "0B");
    let (san, _) = served(port, Some("x.wild.test")).unwrap();
    assert!(san.contains("DNS:*.wild.test"), "{san}");
    let (san, serial) = served(port, Some("b.test")).unwrap();
    assert!(
        san.contains("DNS:b.test") && !san.contains("a.test"),
        "{san}"
    );
    assert_eq!(serial, "16");
    // No SNI: the default (b), not the first.
    let (_, serial) = served(port, None).unwrap();
    assert_eq!(serial, "16", "{}", d.log());
    // A verifying client (TLS 1.3 and 1.2) accepts what it is served.
    for v in ["--tlsv1.3", "--tlsv1.2"] {
        let (body, tail) = curl(&pki.ca(), v, "x.wild.test", port, "/");
        assert_eq!((body.as_str(), tail.as_str()), ("hello from f", "200 0"));
    }
    let out = run(Command::new("curl").args([
        "-sS",
        "--tlsv1.2",
        "--tls-max",
        "1.2",
        "--http1.1", // ALPN http/1.1 (h2 is offered too, and preferred)
        "--cacert",
        &pki.ca().display().to_string(),
        "--resolve",
        &format!("a.test:{port}:127.0.0.1"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        &format!("https://a.test:{port}/"),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1.1");
}

#[test]
fn host_routing_on_tls_and_plain_http_with_forwarded_headers() {
    if !tools("host_routing_on_tls_and_plain_http_with_forwarded_headers") {
        return;
    }
    let pki = Pki::new();
    let (cert, key) = pki.issue("s", &["a.test", "*.wild.test", "gw.test"], 1);
    let (gw, port) = tls_gateway("");
    let d = Daemon::start_with(
        &gw,
        &format!(
            "{}{}{}{}",
            cert_table(&cert, &key, true),
            function("fa", "hosts = [\"a.test\"]"),
            function("fw", "hosts = [\"*.wild.test\"]"),
            function("other", ""),
        ),
    );
    let ca = pki.ca();
    assert_eq!(
        curl(&ca, "--tlsv1.3", "a.test", port, "/any/path").0,
        "hello from fa"
    );
    assert_eq!(
        curl(&ca, "--tlsv1.2", "x.wild.test", port, "/").0,
        "hello from fw"
    );
    // A covered name without a claim: /function/<name>/ as on the plain port.
    assert_eq!(
        curl(&ca, "--tlsv1.3", "gw.test", port, "/function/other/").0,
        "hello from other"
    );
    // Plain HTTP: the Host header routes.
    let r = with_host(d.shared, "deep.wild.test:80", "/x");
    assert_eq!(r.text(), "hello from fw\n");
    // Two Host headers are refused, not guessed between.
    let r = request(loopback(d.shared), "GET", "/x", &[("Host", "a.test")], None).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    // Wildcards are one label deep.
    let r = with_host(d.shared, "a.deep.wild.test", "/x");
    assert_eq!(r.status, 404, "{}", r.text());

    // What the function is told.
    let (headers, _) = curl(&ca, "--tlsv1.3", "a.test", port, "/headers");
    assert!(headers.contains("x-forwarded-proto: https"), "{headers}");
    assert!(
        headers.contains(&format!("x-forwarded-host: a.test:{port}")),
        "{headers}"
    );
    assert!(headers.contains("x-forwarded-for: 127.0.0.1"), "{headers}");
    assert!(
        headers.contains(&format!(
            "forwarded: for=127.0.0.1;proto=https;host=\"a.test:{port}\""
        )),
        "{headers}"
    );
    let r = with_host(d.shared, "a.test\r\nX-Forwarded-Proto: https", "/headers");
    assert!(
        r.text().contains("x-forwarded-proto: http\n"),
        "{}",
        r.text()
    );

    // SNI for one function, Host for another on the same connection: 421.
    let out = run(Command::new("curl").args([
        "-sS",
        "--cacert",
        &ca.display().to_string(),
        "--resolve",
        &format!("a.test:{port}:127.0.0.1"),
        "-H",
        "Host: x.wild.test",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("https://a.test:{port}/"),
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "421");
}

/// A plain HTTP GET with exactly one Host header (`host` may carry more header lines).
fn with_host(port: u16, host: &str, path: &str) -> Resp {
    let mut s = TcpStream::connect(loopback(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Resp {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
        elapsed: Duration::ZERO,
    }
}

/// Python client: handshake with `name`, print "handshaken", wait for a line on stdin,
/// then send one request per further line and print each status and body.
const PY_CLIENT: &str = r#"
import socket, ssl, sys
ca, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname=name)
print("handshaken", s.version(), flush=True)
f = s.makefile("rb")
for line in sys.stdin:
    s.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (line.strip(), name)).encode())
    status = f.readline().decode().split()[1]
    length, cold = 0, "?"
    while True:
        h = f.readline().decode().strip()
        if not h:
            break
        k, v = h.split(":", 1)
        if k.lower() == "content-length":
            length = int(v)
        if k.lower() == "x-synwake-cold-start":
            cold = v.strip()
    print(status, cold, f.read(length).decode().strip(), flush=True)
"#;

struct PyClient {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl PyClient {
    fn connect(ca: &Path, port: u16, name: &str) -> PyClient {
        let mut child = Command::new(PY)
            .args([
                "-c",
                PY_CLIENT,
                &ca.display().to_string(),
                &port.to_string(),
                name,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let out = BufReader::new(child.stdout.take().unwrap());
        let mut c = PyClient { child, out };
        let line = c.line();
        assert!(line.starts_with("handshaken TLSv1."), "{line:?}");
        c
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim().to_string()
    }

    fn get(&mut self, path: &str) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{path}").unwrap();
        stdin.flush().unwrap();
        self.line()
    }
}

impl Drop for PyClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sni_wakes_the_function_before_the_request_is_sent() {
    if !tools("sni_wakes_the_function_before_the_request_is_sent") {
        return;
    }
    let pki = Pki::new();
    let (cert, key) = pki.issue("s", &["slow.test"], 1);
    let (gw, port) = tls_gateway("");
    let d = Daemon::start_with(
        &gw,
        &format!(
            "{}{}",
            cert_table(&cert, &key, true),
            function(
                "slow",
                "hosts = [\"slow.test\"]\nenv = { INIT_MS = \"300\" }"
            )
        ),
    );
    assert_eq!(d.available("slow"), 0);
    let mut c = PyClient::connect(&pki.ca(), port, "slow.test");
    // The client paused after the handshake and sent nothing: the ClientHello alone
    // started the function.
    assert!(
        wait_until(Duration::from_secs(20), || d.available("slow") == 1),
        "not started by the handshake alone:\n{}",
        d.log()
    );
    let m = d.metrics();
    assert_eq!(
        metric(
            &m,
            "synwake_cold_starts_total{function=\"slow\",trigger=\"sni\"}"
        ),
        Some(1.0),
        "{m}"
    );
    // The request then finds it warm.
    assert_eq!(c.get("/"), "200 false hello from slow");
}

#[test]
fn unknown_sni_gets_an_alert_and_wakes_nothing() {
    if !tools("unknown_sni_gets_an_alert_and_wakes_nothing") {
        return;
    }
    let pki = Pki::new();
    let (cert, key) = pki.issue("s", &["f.test"], 1);
    let (gw, port) = tls_gateway("");
    let d = Daemon::start_with(
        &gw,
        &format!(
            "{}{}",
            cert_table(&cert, &key, true),
            function("f", "hosts = [\"f.test\"]")
        ),
    );
    let err = served(port, Some("nope.test")).unwrap_err();
    assert!(err.contains("alert"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(d.available("f"), 0);
    let m = d.metrics();
    assert!(!m.contains("trigger=\"sni\""), "{m}");
    assert!(d.log().contains("\"nope.test\" is not served here"));
}

#[test]
fn bad_input_at_the_tls_port_is_answered_and_bounded() {
    if !tools("bad_input_at_the_tls_port_is_answered_and_bounded") {
        return;
    }
    let pki = Pki::new();
    let (cert, key) = pki.issue("s", &["f.test"], 1);
    let (gw, port) = tls_gateway("tls_handshake_timeout = \"500ms\"\n");
    let d = Daemon::start_with(
        &gw,
        &format!(
            "{}{}",
            cert_table(&cert, &key, true),
            function("f", "hosts = [\"f.test\"]")
        ),
    );
    // Plain HTTP on the TLS port: a readable 400.
    let r = request(loopback(port), "GET", "/", &[], None).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("HTTPS"), "{}", r.text());

    // A silent client is closed at the handshake timeout.
    let mut s = TcpStream::connect(loopback(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t0 = Instant::now();
    let n = s.read(&mut [0u8; 16]).unwrap_or(0);
    let waited = t0.elapsed();
    assert_eq!(n, 0, "expected EOF");
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(8),
        "closed after {waited:?}"
    );

    // Garbage: an alert or a close, never an answer from a function.
    let mut s = TcpStream::connect(loopback(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
        .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty() || buf[0] == 0x15, "not an alert: {buf:?}");
    let mut s = TcpStream::connect(loopback(port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0xff; 64]).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(buf.is_empty() || buf[0] == 0x15, "not an alert: {buf:?}");

    // None of it woke anything, and the port still serves.
    assert_eq!(d.available("f"), 0);
    assert_eq!(
        curl(&pki.ca(), "--tlsv1.3", "f.test", port, "/").0,
        "hello from f"
    );
}

#[test]
fn certificates_reload_on_change_and_sighup_with_a_connection_open_across() {
    if !tools("certificates_reload_on_change_and_sighup_with_a_connection_open_across") {
        return;
    }
    let pki = Pki::new();
    let (cert, key) = pki.issue("s", &["f.test"], 1);
    let (gw, port) = tls_gateway("");
    let d = Daemon::start_with(
        &gw,
        &format!(
            "{}{}",
            cert_table(&cert, &key, true),
            function("f", "hosts = [\"f.test\"]")
        ),
    );
    let mut open = PyClient::connect(&pki.ca(), port, "f.test");
    let first = open.get("/");
    assert!(
        first.starts_with("200 ") && first.ends_with(" hello from f"),
        "{first}"
    );
    assert_eq!(served(port, Some("f.test")).unwrap().1, "01");

    // Rewritten files are picked up by the poller.
    pki.issue("s", &["f.test"], 2);
    assert!(
        wait_until(Duration::from_secs(15), || served(port, Some("f.test"))
            .is_ok_and(|(_, s)| s == "02")),
        "new certificate not served:\n{}",
        d.log()
    );
    assert_eq!(open.get("/"), "200 false hello from f");

    // A broken file keeps the previous certificate and says why.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || d
            .log()
            .contains("reload failed, keeping the previous one")),
        "{}",
        d.log()
    );
    assert!(!d.log().contains("not base64!"), "file content in the log");
    assert_eq!(served(port, Some("f.test")).unwrap().1, "02");

    // SIGHUP reloads at once.
    pki.issue("s", &["f.test"], 3);
    signal(d.pid(), libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || served(port, Some("f.test"))
            .is_ok_and(|(_, s)| s == "03")),
        "{}",
        d.log()
    );
    assert!(
        d.log().contains("SIGHUP: 1 certificate(s) reloaded"),
        "{}",
        d.log()
    );
    // The connection handshaken with the first certificate still works.
    assert_eq!(open.get("/"), "200 false hello from f");
}

#[test]
fn a_private_key_readable_by_others_is_refused_at_start() {
    if !tools("a_private_key_readable_by_others_is_refused_at_start") {
        return;
    }
    let pki = Pki::new();
    let (cert, key) = pki.issue("s", &["f.test"], 1);
    set_mode(&key, 0o644);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("synwake.toml");
    let (gw, _) = tls_gateway("");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:{}\"\napi_listen = \"127.0.0.1:{}\"\nstate_dir = {:?}\n{gw}\n[probe]\nmode = \"off\"\n{}",
            free_port(),
            free_port(),
            dir.path().join("state").display().to_string(),
            cert_table(&cert, &key, true)
        ),
    )
    .unwrap();
    let out = Command::new(synwake_bin())
        .args(["up", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("readable by group or others (mode 0644)") && err.contains("s.key"),
        "{err}"
    );
}

#[test]
fn deploy_claims_hosts_and_a_tls_port_and_refuses_a_second_claim() {
    if !tools("deploy_claims_hosts_and_a_tls_port_and_refuses_a_second_claim") {
        return;
    }
    let pki = Pki::new();
    let (cert, key) = pki.issue("s", &["*.api.test", "own.test"], 1);
    let (gw, port) = tls_gateway("");
    let d = Daemon::start_with(&gw, &cert_table(&cert, &key, true));
    let fn_cmd = fn_bin().display().to_string();
    let own = free_port();
    let r = d.api_json(
        "POST",
        "/system/functions",
        &format!(
            r#"{{"service":"one","envProcess":"{fn_cmd}","annotations":{{"com.synwake.hosts":"a.api.test, B.api.test","com.synwake.tls-port":"{own}"}}}}"#
        ),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(
        curl(&pki.ca(), "--tlsv1.3", "b.api.test", port, "/").0,
        "hello from one"
    );
    // Its own TLS port: every path, whatever the name.
    assert_eq!(
        curl(&pki.ca(), "--tlsv1.2", "own.test", own, "/p").0,
        "hello from one"
    );
    let st = d.status("one");
    assert_eq!(
        st["annotations"]["com.synwake.hosts"],
        "a.api.test,b.api.test"
    );
    assert_eq!(
        st["annotations"]["com.synwake.tls-port"],
        own.to_string().as_str()
    );
    let r = d.api_json(
        "POST",
        "/system/functions",
        &format!(
            r#"{{"service":"two","envProcess":"{fn_cmd}","annotations":{{"com.synwake.hosts":"b.api.test"}}}}"#
        ),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("two") && r.text().contains("one") && r.text().contains("b.api.test"),
        "{}",
        r.text()
    );
}
