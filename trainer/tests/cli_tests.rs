//! `drllm-train` as a process on a tiny model whose tokenizer has no single-token option
//! letters: continuation scoring works without them, letter scoring (and a question without
//! answer texts) is refused with the reason.

use drllm_testkit::{write_tiny_model, Family, TinySpec};
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_drllm-train");

fn write_data(dir: &Path, with_texts: bool) {
    let words = ["cat", "dog", "sat", "mat", "red", "big"];
    let mut text = String::new();
    for i in 0..4usize {
        let w = |k: usize| words[(i + k) % words.len()];
        let texts: Vec<String> = (0..4).map(|k| format!("{} {}", w(k), w(k + 2))).collect();
        let q = format!("the {} is on the {}", w(0), w(1));
        let letter = ["A", "B", "C", "D"][i % 4];
        let ex = serde_json::json!({
            "id": format!("tiny/validation/q{i}"), "task": "tiny", "split": "validation",
            "kind": "MultipleChoice",
            "prompt": format!("{q}\n A. {}\n B. {}\n C. {}\n D. {}\nAnswer:", texts[0], texts[1], texts[2], texts[3]),
            "choices": ["A", "B", "C", "D"], "gold": i % 4, "answer": letter,
            "texts": if with_texts { texts } else { Vec::new() },
            "cont_prompt": format!("{q}\nAnswer:"),
        });
        text.push_str(&ex.to_string());
        text.push('\n');
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tiny-validation.jsonl"), text).unwrap();
}

fn search(model: &Path, data: &Path, run: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("search")
        .args([
            "-m",
            model.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .args(["--task", "tiny", "--split", "validation", "-t", "1"])
        .args(["--run-dir", run.to_str().unwrap(), "--simulations", "4"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn continuation_scoring_needs_no_letter_tokens_and_letters_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_model(&TinySpec::default_for(Family::Llama), &model).unwrap();
    let data = dir.path().join("data");
    write_data(&data, true);
    let o = search(&model, &data, &dir.path().join("run"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("cannot score by option letters"), "{err}");
    let results =
        std::fs::read_to_string(dir.path().join("run/search-tiny-validation.jsonl")).unwrap();
    assert_eq!(results.lines().count(), 4);
    // letter scoring: refused before anything runs
    let o = search(
        &model,
        &data,
        &dir.path().join("run-letters"),
        &["--scoring", "letters"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "letter scoring ran: {err}");
    assert!(err.contains("Answer:"), "{err}");
    // a question without answer texts needs the letters: its id is named
    let bare = dir.path().join("bare");
    write_data(&bare, false);
    let o = search(&model, &bare, &dir.path().join("run-bare"), &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("tiny/validation/q0") && err.contains("no answer texts"),
        "{err}"
    );
}
