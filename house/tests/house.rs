//! The house rules, checked on the workspace's own sources (test code left out).

use drllm_house::{line_count, workspace, workspace_root};

/// No function of non-test code is longer than this many lines.
const MAX_FUNCTION_LINES: usize = 150;
/// The trainer's binary parses arguments and dispatches; the work is library code.
const MAX_TRAINER_MAIN_LINES: usize = 700;

#[test]
fn no_function_is_longer_than_150_lines() {
    let root = workspace_root();
    let trees = workspace(&root).expect("sources parse");
    let long: Vec<String> = trees
        .iter()
        .flat_map(|t| t.functions.iter())
        .filter(|f| f.lines > MAX_FUNCTION_LINES)
        .map(|f| {
            format!(
                "{} ({} lines, {}:{})",
                f.name,
                f.lines,
                f.file.display(),
                f.line
            )
        })
        .collect();
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines (split them along the steps they run):\n{}",
        long.join("\n")
    );
}

#[test]
fn no_crate_has_a_module_cycle() {
    let root = workspace_root();
    let trees = workspace(&root).expect("sources parse");
    let mut found = Vec::new();
    for t in &trees {
        for c in t.cycles() {
            let evidence: Vec<String> = t
                .edges_within(&c)
                .iter()
                .map(|e| format!("{} -> {} at {}:{}", e.from, e.to, e.file.display(), e.line))
                .collect();
            found.push(format!(
                "{}: {}\n  {}",
                t.name,
                c.join(" <-> "),
                evidence.join("\n  ")
            ));
        }
    }
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
}

#[test]
fn the_trainer_binary_only_parses_and_dispatches() {
    let main = workspace_root().join("trainer/src/main.rs");
    let n = line_count(&main);
    assert!(
        n <= MAX_TRAINER_MAIN_LINES,
        "{} has {n} lines (at most {MAX_TRAINER_MAIN_LINES}: the work belongs in the library)",
        main.display()
    );
}

/// The checker itself: it sees the workspace's crates, their functions and their uses.
#[test]
fn the_checker_reads_every_crate() {
    let root = workspace_root();
    let trees = workspace(&root).expect("sources parse");
    for name in [
        "engine:src/lib.rs",
        "server:src/lib.rs",
        "trainer:src/lib.rs",
        ".:src/main.rs",
    ] {
        let t = trees
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no module tree {name}"));
        assert!(t.files.len() > 3, "{name}: {} files", t.files.len());
        assert!(!t.functions.is_empty() && !t.edges.is_empty(), "{name}");
    }
    let engine = trees
        .iter()
        .find(|t| t.name == "engine:src/lib.rs")
        .unwrap();
    assert!(engine.functions.iter().any(|f| f.name == "Model::load"));
    // session.rs uses kv.rs
    assert!(engine
        .edges
        .iter()
        .any(|e| e.from == "session" && e.to == "kv"));
}
