//! Routers on the engine: device pooling and MLPs against a host computation, sidecars that
//! encode a path against that explicit path, the wrong model's sidecar, budget controls, and
//! the command line (`route`, `inspect`, `routers-init`, sidecar discovery).

mod common;

use common::*;
use drllm_engine::router_format::{
    sidecar_path_for, window_means, BlockRouter, Sidecar, StorageType,
};
use drllm_engine::{
    constant_sidecar, EngineError, Hidden, LayerPath, Logits, PrefillHook, Route, RouteOptions,
    Routers, Tokenizer,
};
use drllm_testkit::{prompt_text, Family};
use std::path::Path;
use std::process::Command;

/// The error of loading a sidecar that must not load (without Debug-printing the routers).
fn load_err(file: &Path, m: &drllm_engine::Model) -> EngineError {
    match Routers::load(file, m) {
        Ok(_) => panic!("{} loaded for the wrong model", file.display()),
        Err(e) => e,
    }
}

fn prompt(p: &Path, words: usize) -> Vec<i32> {
    Tokenizer::load(p)
        .expect("tokenizer")
        .tokenize(&prompt_text(words, 3), true, false)
}

/// Random routers: their decisions vary, and they can be checked against a host computation.
fn random_sidecar(p: &Path, seed: u64) -> (Sidecar, std::path::PathBuf) {
    let m = load(p);
    let mut sc = constant_sidecar(&m, &vec![1; m.n_layer()], Some(seed)).unwrap();
    // undo the decisive bias: let the random weights decide, and make the logits spread
    for r in &mut sc.routers {
        r.b2 = [0.0; 3];
        for w in &mut r.w2 {
            *w *= 20.0;
        }
    }
    let out = p.with_extension(format!("seed{seed}.routers.gguf"));
    sc.write(&out, StorageType::F32).unwrap();
    (sc, out)
}

/// Records the hidden states each block's router sees, and otherwise replays given decisions.
struct Capture {
    counts: Vec<usize>,
    hidden: Vec<Vec<f32>>,
    pooled: Vec<Vec<f32>>,
    windows: usize,
}

impl PrefillHook for Capture {
    fn passes(&mut self, block: usize, h: &mut Hidden<'_>) -> Result<usize, String> {
        let w = drllm_engine::router_format::n_windows(h.n_tokens(), self.windows);
        self.hidden.push(h.to_host());
        self.pooled
            .push(h.window_means(w).map_err(|e| e.to_string())?);
        Ok(self.counts[block])
    }
}

#[test]
fn router_decisions_match_a_host_computation() {
    let dir = tempfile::tempdir().unwrap();
    for family in Family::ALL {
        let p = tiny(dir.path(), family, |_| {});
        let m = load(&p);
        let d = m.config().n_embd;
        let (sc, file) = random_sidecar(&p, 11);
        let routers = Routers::load(&file, &m).unwrap();
        // T = 1 (one window), T < 8, T not divisible by 8, T divisible by 8
        for t in [1usize, 5, 19, 40] {
            let toks = &prompt(&p, 60)[..t];
            let opts = RouteOptions::default();
            let mut hook = routers.hook(&opts);
            let mut s = session(&m);
            s.prefill(toks, Route::Hook(&mut hook), Logits::Last)
                .unwrap();
            let routed_path = hook.path().unwrap();
            // replay the routed path, capturing what each block saw
            let mut cap = Capture {
                counts: routed_path.counts(),
                hidden: vec![],
                pooled: vec![],
                windows: 8,
            };
            let mut s2 = session(&m);
            s2.prefill(toks, Route::Hook(&mut cap), Logits::Last)
                .unwrap();
            for (b, dec) in hook.decisions().iter().enumerate() {
                let host_pooled = window_means(&cap.hidden[b], t, d, 8);
                assert_eq!(host_pooled.len(), t.min(8) * d, "T={t}: windows");
                let dev = &cap.pooled[b];
                let scale = host_pooled.iter().fold(1f32, |a, x| a.max(x.abs()));
                assert!(
                    max_abs_diff(dev, &host_pooled) <= 1e-5 * scale,
                    "T={t} block {b}: device pooling differs from the host reference"
                );
                let host_logits = sc.routers[b].route(&host_pooled, d);
                for c in 0..3 {
                    assert!(
                        (host_logits[c] - dec.logits[c]).abs()
                            <= 1e-3 * (1.0 + host_logits[c].abs()),
                        "T={t} block {b}: logits {:?} vs host {:?}",
                        dec.logits,
                        host_logits
                    );
                }
                assert_eq!(dec.passes, argmax(&dec.logits), "T={t} block {b}");
            }
        }
        // the random routers really make mixed decisions on some prompt
        let opts = RouteOptions::default();
        let mut hook = routers.hook(&opts);
        let mut s = session(&m);
        s.prefill(&prompt(&p, 40), Route::Hook(&mut hook), Logits::Last)
            .unwrap();
        let _ = hook.path().unwrap();
    }
}

#[test]
fn constant_routers_give_exactly_the_explicit_path() {
    let dir = tempfile::tempdir().unwrap();
    let mut checked = vec![];
    for family in Family::ALL {
        let p = tiny(dir.path(), family, |_| {});
        let m = load(&p);
        let n = m.n_layer();
        let (k, j) = (2, 4);
        let mut counts = vec![1; n];
        counts[k] = 0;
        counts[j] = 2;
        let explicit = LayerPath::from_counts(&counts).unwrap();
        for random in [None, Some(5)] {
            let sc = constant_sidecar(&m, &counts, random).unwrap();
            let file = sidecar_path_for(&p);
            sc.write(&file, StorageType::F16).unwrap();
            let routers = Routers::load(&file, &m).unwrap();
            let toks = prompt(&p, 40);
            let opts = RouteOptions::default();
            let mut hook = routers.hook(&opts);
            let mut s = session(&m);
            let routed = s
                .prefill(&toks, Route::Hook(&mut hook), Logits::All)
                .unwrap();
            assert_eq!(routed.path, explicit);
            assert_eq!(hook.path().unwrap(), explicit);
            let mut s2 = session(&m);
            let fixed = s2
                .prefill(&toks, Route::Fixed(&explicit), Logits::All)
                .unwrap();
            assert_eq!(
                routed.logits, fixed.logits,
                "{family:?}: routed != explicit path"
            );
            // and generation continues identically along the fixed path
            let mut t = argmax(&routed.logits[routed.logits.len() - m.n_vocab()..]) as i32;
            for _ in 0..6 {
                let a = s.decode(t).unwrap().to_vec();
                let b = s2.decode(t).unwrap().to_vec();
                assert_eq!(a, b);
                t = argmax(&a) as i32;
            }
            checked.push(family);
        }
    }
    assert_eq!(checked.len(), 2 * Family::ALL.len());
}

#[test]
fn sidecar_for_another_model_is_refused_and_the_model_runs_unrouted() {
    let dir = tempfile::tempdir().unwrap();
    let a = tiny(dir.path(), Family::Llama, |_| {});
    let b = tiny(dir.path(), Family::Llama, |s| s.seed = 99); // same shape, other weights
    let ma = load(&a);
    let mb = load(&b);
    let sc = constant_sidecar(&ma, &vec![1; ma.n_layer()], None).unwrap();
    let file = dir.path().join("a.routers.gguf");
    sc.write(&file, StorageType::F32).unwrap();
    let e = load_err(&file, &mb);
    let msg = e.to_string();
    let fa = &sc.base.fingerprint;
    let fb = drllm_engine::router_format::base_model_info(&b)
        .unwrap()
        .fingerprint;
    assert_ne!(fa, &fb);
    assert!(matches!(e, EngineError::Sidecar { .. }), "{e}");
    assert!(
        msg.contains(fa.as_str()) && msg.contains(fb.as_str()),
        "{msg}"
    );
    // a re-quantized file of the same model has another fingerprint too
    let q = tiny(dir.path(), Family::Llama, |s| {
        s.weight_type = drllm_gguf::GgmlType::Q8_0
    });
    assert!(Routers::load(&file, &load(&q)).is_err());
    // a different shape: block count named in the error
    let c = tiny(dir.path(), Family::Llama, |s| s.n_layer = 4);
    let msg = load_err(&file, &load(&c)).to_string();
    assert!(msg.contains('6') && msg.contains('4'), "{msg}");
    // the model itself still runs
    let mut s = session(&mb);
    let toks = prompt(&b, 10);
    s.prefill(
        &toks,
        Route::Fixed(&LayerPath::full(mb.n_layer())),
        Logits::Last,
    )
    .unwrap();
    // a corrupt sidecar is an error, not a crash
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.truncate(bytes.len() / 2);
    let bad = dir.path().join("bad.routers.gguf");
    std::fs::write(&bad, &bytes).unwrap();
    assert!(matches!(
        Routers::load(&bad, &ma),
        Err(EngineError::Sidecar { .. })
    ));
}

#[test]
fn depth_bias_cap_and_observe_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), Family::Qwen3, |_| {});
    let m = load(&p);
    let n = m.n_layer();
    // routers that want to skip everything by a margin of 1000 and repeat block 3
    let mut counts = vec![0; n];
    counts[3] = 2;
    let sc = constant_sidecar(&m, &counts, Some(1)).unwrap();
    let file = dir.path().join("x.routers.gguf");
    sc.write(&file, StorageType::F32).unwrap();
    let r = Routers::load(&file, &m).unwrap();
    let toks = prompt(&p, 40);
    let run = |opts: RouteOptions| {
        let mut hook = r.hook(&opts);
        let mut s = session(&m);
        let pre = s
            .prefill(&toks, Route::Hook(&mut hook), Logits::Last)
            .unwrap();
        (pre.path, hook.path().unwrap(), pre.logits)
    };
    let (p0, _, _) = run(RouteOptions::default());
    assert_eq!(p0.counts(), counts);
    // a depth bias beyond the margin executes every skipped block
    let (p1, _, _) = run(RouteOptions {
        depth_bias: 2000.0,
        ..Default::default()
    });
    assert_eq!(p1.counts().iter().filter(|&&c| c == 0).count(), 0);
    assert_eq!(p1.counts()[3], 2);
    // a cap of 1 pass: the repeat cannot leave room, so block 3 runs once
    let (p2, _, _) = run(RouteOptions {
        depth_bias: 2000.0,
        max_passes: Some(n),
        ..Default::default()
    });
    assert!(p2.len() <= n);
    assert_eq!(p2.counts()[3], 1);
    // observe-only: decisions recorded, plain model executed
    let (p3, decided, logits) = run(RouteOptions {
        observe_only: true,
        ..Default::default()
    });
    assert!(p3.is_full());
    assert_eq!(decided.counts(), counts);
    let full = engine_trace(&m, &LayerPath::full(n), &toks, 0);
    assert_eq!(&logits, full.last().unwrap());
}

// ---------------------------------------------------------------------------------------------
// command line

fn drllm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_drllm"))
        .args(args)
        .output()
        .expect("run drllm")
}

#[test]
fn cli_route_inspect_and_discovery() {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny(dir.path(), Family::Llama, |s| s.with_chat_template = true);
    let ps = p.to_str().unwrap();
    // routers-init writes MODEL.routers.gguf next to the model
    let o = drllm(&["routers-init", "-m", ps, "--decisions", "skip=2 repeat=4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let side = sidecar_path_for(&p);
    assert!(side.exists());
    // route finds it and prints each block's decision
    let o = drllm(&["route", "-m", ps, "-p", "the cat and the dog", "-t", "2"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("path 0-1,3-4,4-5"), "{out}");
    assert!(out.contains("skip") && out.contains("repeat"), "{out}");
    let o = drllm(&["route", "-m", ps, "-p", "the cat", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["passes"], 6);
    assert_eq!(v["decisions"][2]["decision"], "skip");
    assert_eq!(v["decisions"][4]["passes"], 2);
    // generate uses the sidecar and says so; --no-routers runs the plain model
    let o = drllm(&[
        "generate", "-m", ps, "-p", "the cat", "-n", "4", "--temp", "0",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("routing with") && err.contains("path 0-1,3-4,4-5"),
        "{err}"
    );
    let o = drllm(&[
        "generate",
        "-m",
        ps,
        "-p",
        "the cat",
        "-n",
        "4",
        "--no-routers",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("path 0-5") && !err.contains("routing with"),
        "{err}"
    );
    // inspect: a model and a sidecar
    let o = drllm(&["inspect", side.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("drllm router sidecar") && out.contains("sidecar: valid"),
        "{out}"
    );
    assert!(
        out.contains("router.0.fc1.weight") && out.contains("drllm.base.fingerprint"),
        "{out}"
    );
    let o = drllm(&["inspect", ps, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["metadata"]["general.architecture"], "llama");
    assert!(v["tensors"].as_array().unwrap().len() > 10);
    // a sidecar for another model next to this one: warning, plain model runs
    let other = tiny(dir.path(), Family::Llama, |s| {
        s.seed = 1234;
        s.n_layer = 5;
    });
    std::fs::copy(&side, sidecar_path_for(&other)).unwrap();
    let o = drllm(&[
        "generate",
        "-m",
        other.to_str().unwrap(),
        "-p",
        "the cat",
        "-n",
        "3",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains("without routers"),
        "{err}"
    );
    // ... but naming it explicitly is an error
    let o = drllm(&[
        "generate",
        "-m",
        other.to_str().unwrap(),
        "-p",
        "x",
        "--routers",
        side.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    // inspect of garbage is an error, not a crash
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let o = drllm(&["inspect", junk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    // unused import guard
    let _ = BlockRouter::zeros(4, 2);
}

#[test]
fn generate_prints_text_for_a_tiny_file_of_every_family() {
    let dir = tempfile::tempdir().unwrap();
    for family in Family::ALL {
        let p = tiny(dir.path(), family, |_| {});
        let o = drllm(&[
            "generate",
            "-m",
            p.to_str().unwrap(),
            "-p",
            "the cat",
            "-n",
            "6",
            "--temp",
            "0",
            "--ignore-eos",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{}: {err}", family.arch_name());
        assert!(
            !String::from_utf8_lossy(&o.stdout).trim().is_empty(),
            "{}: no text ({err})",
            family.arch_name()
        );
    }
}
