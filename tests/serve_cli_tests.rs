//! The `drllm serve`, `drllm stats` and `drllm loadtest` commands as a user runs them: settings
//! from flags over `DRLLM_*` variables over the TOML file, a request, the routing log read
//! back as a table, JSON and PNG, a bounded load test, and clear errors for bad settings.

mod common;

use common::*;
use drllm_engine::constant_sidecar;
use drllm_engine::router_format::{sidecar_path_for, StorageType};
use drllm_server::client;
use drllm_testkit::Family;
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_healthy(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client::request(
            ("127.0.0.1", port),
            "GET",
            "/health",
            None,
            None,
            Duration::from_secs(5),
        ) {
            if r.status == 200 {
                return;
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("drllm serve exited: {st}");
        }
        assert!(Instant::now() < deadline, "no healthy server on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_layers_settings_logs_and_stats_reads_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), Family::Llama, |s| s.with_chat_template = true);
    let m = load(&model);
    constant_sidecar(&m, &[1, 0, 1, 1, 2, 1], None)
        .unwrap()
        .write(&sidecar_path_for(&model), StorageType::F32)
        .unwrap();
    let db = dir.path().join("state/routing.sqlite");
    let (p_file, p_env, p_flag) = (free_port(), free_port(), free_port());
    let cfg = dir.path().join("drllm.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\nport = {p_file}\nmodel_alias = \"from-file\"\nqueue = 3\nthreads = 1\ndb = {:?}\n",
            model.display().to_string(),
            db.display().to_string()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_drllm"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--port", &p_flag.to_string()])
        .env("DRLLM_PORT", p_env.to_string())
        .env("DRLLM_MODEL_ALIAS", "from-env")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut d = Daemon(child);
    // the flag's port wins over the environment's and the file's
    wait_healthy(p_flag, &mut d.0);
    let addr = ("127.0.0.1", p_flag);
    let get = |path: &str| {
        client::request(addr, "GET", path, None, None, Duration::from_secs(30))
            .unwrap()
            .json()
            .unwrap()
    };
    // the environment's alias wins over the file's
    let models: Value = get("/v1/models");
    assert_eq!(models["data"][0]["id"], "from-env");
    for i in 0..3 {
        let body = json!({"model": "from-env", "messages": [{"role": "user", "content": format!("hello {i}")}],
                          "max_tokens": 4, "temperature": 0, "ignore_eos": true});
        let r = client::request(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(&body.to_string()),
            None,
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json().unwrap()["drllm"]["skipped"], json!([1]));
    }

    // a bounded load test against it
    let out = Command::new(env!("CARGO_BIN_EXE_drllm"))
        .args(["loadtest", "--addr", &format!("127.0.0.1:{p_flag}")])
        .args(["-n", "12", "-c", "4", "--max-tokens", "4", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lt: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        lt["ok"].as_u64().unwrap() + lt["refused_503"].as_u64().unwrap(),
        12,
        "{lt}"
    );
    assert_eq!(lt["errors"], 0);
    assert!(lt["latency_p95_seconds"].as_f64().unwrap() > 0.0);
    assert!(!lt["server_rss_mib"].as_array().unwrap().is_empty());
    let n_ok = 3 + lt["ok"].as_u64().unwrap();
    drop(d);

    // the log, read back
    let stats = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_drllm"))
            .args(["stats", "--db"])
            .arg(&db)
            .args(args)
            .output()
            .unwrap()
    };
    let out = stats(&["--since", "all", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["requests"].as_u64(), Some(n_ok), "{s}");
    assert_eq!(s["routed"].as_u64(), Some(n_ok));
    assert_eq!(s["blocks"][1], json!([n_ok, 0, 0]));
    assert_eq!(s["blocks"][4], json!([0, 0, n_ok]));
    let out = stats(&["--since", "1h"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| 1 | "), "{table}");
    let png = dir.path().join("heat.png");
    let out = stats(&["--since", "all", "--png", png.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    // an empty window
    let out = stats(&["--since", "all", "--until", "1"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("0 requests"));
}

#[test]
fn serve_rejects_bad_settings_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_drllm"));
        c.arg("serve").args(args).arg("--no-db");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        assert!(!out.status.success(), "{args:?} {env:?} started");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let missing = dir.path().join("none.gguf");
    let e = run(&["--model", missing.to_str().unwrap(), "--port", "0"], &[]);
    assert!(e.contains("not found"), "{e}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "modle = \"x.gguf\"\n").unwrap();
    let e = run(&["--config", bad.to_str().unwrap(), "--port", "0"], &[]);
    assert!(e.contains("modle"), "{e}");
    let e = run(
        &["--port", "0"],
        &[("DRLLM_PARALLEL", "0"), ("DRLLM_MODEL", "x.gguf")],
    );
    assert!(e.contains("parallel"), "{e}");
    let e = run(
        &["--device", "tpu", "--model", "x.gguf", "--port", "0"],
        &[],
    );
    assert!(e.contains("device"), "{e}");
    // a bad value in the environment is reported (no --port: the variable is read)
    let e = run(&["--model", "x.gguf"], &[("DRLLM_PORT", "not-a-port")]);
    assert!(e.contains("not-a-port"), "{e}");
    // a model that is not a GGUF file: a clear error, not a crash
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let e = run(&["--model", junk.to_str().unwrap(), "--port", "0"], &[]);
    assert!(e.contains("junk.gguf"), "{e}");
}

#[cfg(unix)]
#[test]
fn serve_tells_systemd_it_is_ready_only_once_the_model_is_loaded() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path(), Family::Llama, |s| s.with_chat_template = true);
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_drllm"))
        .args([
            "serve",
            "--no-db",
            "--no-routers",
            "--threads",
            "1",
            "--port",
        ])
        .arg(port.to_string())
        .arg("--model")
        .arg(&model)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut d = Daemon(child);
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("no readiness notification");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    // ready means loaded: the model answers at once, without any wait for health
    let r = client::request(
        ("127.0.0.1", port),
        "GET",
        "/health",
        None,
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    // stopping is announced too
    // SAFETY: plain signal to our own child.
    unsafe {
        libc_kill(d.0.id() as i32, 15);
    }
    let n = sock.recv(&mut buf).expect("no stopping notification");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("STOPPING=1"));
    let st = d.0.wait().unwrap();
    assert!(st.success(), "{st}");

    // a model that fails to load never reports ready
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_drllm"))
        .args(["serve", "--no-db", "--port", "0", "--model"])
        .arg(&junk)
        .env("NOTIFY_SOCKET", &sock_path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        sock.recv(&mut buf).is_err(),
        "readiness sent for a failed load"
    );
}

#[cfg(unix)]
extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
