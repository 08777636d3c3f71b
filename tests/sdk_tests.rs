//! The real clients apps use, against `drllm serve` as a process: the `openai` Python SDK
//! (pinned, installed by scripts/sdk-env.sh) runs tests/sdk/openai_check.py on a tiny model
//! and on SmolLM2. Needs `DRLLM_SDK_PYTHONPATH` (scripts/test.sh sets it); without it the test
//! says so and passes, unless `DRLLM_REQUIRE_SDK=1` (scripts/test.sh, CI), which fails it.

mod common;

use common::*;
use drllm_server::client;
use drllm_testkit::Family;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository (cargo's run-time `CARGO_MANIFEST_DIR` first: a test binary reused from a
/// clone elsewhere that shares the target folder would read that clone's files).
fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// drllm's ChatML template with tool calls (SmolLM2's own has none).
fn tool_template() -> String {
    repo()
        .join("templates/chatml-tools.jinja")
        .to_string_lossy()
        .into_owned()
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The SDK's folder, or None (with a note) when the test cannot run.
fn sdk() -> Option<PathBuf> {
    match std::env::var_os("DRLLM_SDK_PYTHONPATH") {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            assert!(
                std::env::var("DRLLM_REQUIRE_SDK").as_deref() != Ok("1"),
                "DRLLM_SDK_PYTHONPATH is not set and DRLLM_REQUIRE_SDK=1: run scripts/sdk-env.sh"
            );
            eprintln!("skipping: no SDK (DRLLM_SDK_PYTHONPATH unset; scripts/test.sh sets it)");
            None
        }
    }
}

/// `drllm serve` on `model` (full depth), healthy.
fn serve(model: &Path, extra: &[&str]) -> (Daemon, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_drllm"))
        .args([
            "serve",
            "--no-routers",
            "--no-db",
            "--threads",
            "2",
            "--ctx-size",
            "1024",
        ])
        .arg("-m")
        .arg(model)
        .args(["--port", &port.to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut d = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client::request(
            ("127.0.0.1", port),
            "GET",
            "/health",
            None,
            None,
            Duration::from_secs(5),
        );
        if r.is_ok_and(|r| r.status == 200) {
            return (d, port);
        }
        if let Ok(Some(st)) = d.0.try_wait() {
            panic!("drllm serve exited: {st}");
        }
        assert!(Instant::now() < deadline, "no healthy server on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the check script against the server; gives its JSON summary.
fn openai_check(sdk: &Path, port: u16, extra: &[&str]) -> serde_json::Value {
    let script = repo().join("tests/sdk/openai_check.py");
    let o = Command::new("python3")
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/v1"))
        .args(extra)
        .env("PYTHONPATH", sdk)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "openai_check.py failed:\n{out}\n{err}");
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn the_openai_sdk_drives_every_feature_on_a_tiny_model() {
    let Some(sdk) = sdk() else { return };
    let dir = tempfile::tempdir().unwrap();
    // no space prefix: see server_tests' tool test (the tool grammar and SentencePiece)
    let model = tiny(dir.path(), Family::Llama, |s| {
        s.with_chat_template = true;
        s.add_space_prefix = Some(false);
    });
    let (_d, port) = serve(
        &model,
        &[
            "--model-alias",
            "tiny-one,tiny-two",
            "--chat-template-file",
            &tool_template(),
        ],
    );
    let v = openai_check(&sdk, port, &[]);
    assert_eq!(v["sdk"], "3.60.0");
    assert_eq!(v["model"], "tiny-one");
    assert_eq!(v["n"], 3);
}

#[test]
fn the_openai_sdk_scores_paris_above_london_and_calls_a_tool_on_smollm2() {
    let Some(sdk) = sdk() else { return };
    let Some(model) = real_model(SMOLLM2) else {
        return;
    };
    let (_d, port) = serve(&model, &["--chat-template-file", &tool_template()]);
    let v = openai_check(&sdk, port, &["--smollm2"]);
    assert!(
        v["paris"].as_f64().unwrap() > v["london"].as_f64().unwrap(),
        "{v}"
    );
    assert!(
        v["tool_call"]["city"].as_str().unwrap().contains("Paris"),
        "{v}"
    );
    assert!(!v["tool_answer"].as_str().unwrap().is_empty(), "{v}");
}
