//! Prints the house measurements of the workspace: functions over a length, module cycles,
//! the longest files. `cargo run -p drllm-house -- [--over N]` (default 100).

use drllm_house::{line_count, workspace, workspace_root};

fn main() {
    let mut over = 100;
    let mut edges_of = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--over", Some(n)) if n.parse::<usize>().is_ok() => over = n.parse().unwrap_or(100),
            ("--edges", Some(t)) => edges_of = Some(t),
            _ => {
                eprintln!(
                    "usage: drllm-house [--over N] [--edges TREE]   (TREE e.g. trainer:src/lib.rs)"
                );
                std::process::exit(2);
            }
        }
    }
    let root = workspace_root();
    let trees = match workspace(&root) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    if let Some(name) = edges_of {
        let Some(t) = trees.iter().find(|t| t.name == name) else {
            eprintln!(
                "no module tree {name}; trees: {}",
                trees
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            std::process::exit(2);
        };
        let mut seen = std::collections::BTreeSet::new();
        for e in &t.edges {
            if seen.insert((e.from.clone(), e.to.clone())) {
                println!("{} -> {}", e.from, e.to);
            }
        }
        return;
    }
    let rel = |p: &std::path::Path| p.strip_prefix(&root).unwrap_or(p).display().to_string();
    let mut fns: Vec<_> = trees.iter().flat_map(|t| t.functions.iter()).collect();
    fns.sort_by(|a, b| b.lines.cmp(&a.lines).then(a.file.cmp(&b.file)));
    fns.dedup_by(|a, b| a.file == b.file && a.line == b.line);
    let long: Vec<_> = fns.iter().filter(|f| f.lines > over).collect();
    println!(
        "non-test functions: {} ; over 100 lines: {} ; over 150: {}",
        fns.len(),
        fns.iter().filter(|f| f.lines > 100).count(),
        fns.iter().filter(|f| f.lines > 150).count()
    );
    println!("\nover {over} lines:");
    for f in &long {
        println!("  {:>4}  {}  {}:{}", f.lines, f.name, rel(&f.file), f.line);
    }
    println!("\nmodule cycles (top-level modules of a crate that use each other):");
    let mut n = 0;
    for t in &trees {
        for c in t.cycles() {
            n += 1;
            println!("  {}: {}", t.name, c.join(" <-> "));
            for e in t.edges_within(&c) {
                println!(
                    "      {} -> {}  ({}:{})",
                    e.from,
                    e.to,
                    rel(&e.file),
                    e.line
                );
            }
        }
    }
    if n == 0 {
        println!("  none");
    }
    let mut files: Vec<_> = trees
        .iter()
        .flat_map(|t| t.files.iter())
        .map(|f| (line_count(f), f))
        .collect();
    files.sort_by_key(|f| std::cmp::Reverse(f.0));
    files.dedup_by(|a, b| a.1 == b.1);
    println!("\nlongest files:");
    for (n, f) in files.iter().take(10) {
        println!("  {n:>5}  {}", rel(f));
    }
}
