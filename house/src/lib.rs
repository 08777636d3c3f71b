//! The house rules of the workspace, measured from its sources: how long each function is, and
//! which modules of a crate use which (a cycle among a crate's top-level modules means neither
//! can be understood or changed alone). `house/tests/house.rs` holds the rules; the binary
//! (`cargo run -p drllm-house`) prints the measurements.
//!
//! Test code is left out: files under `tests/`, `benches/` and `fuzz/`, `#[cfg(test)]` modules
//! and `#[test]` functions.

use proc_macro2::Span;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use syn::visit::Visit;

/// A function of the workspace's non-test code.
#[derive(Clone, Debug)]
pub struct Function {
    /// `Type::name` for methods, `name` for free functions.
    pub name: String,
    pub file: PathBuf,
    /// First line (the `fn` keyword).
    pub line: usize,
    /// From the `fn` keyword to the closing brace.
    pub lines: usize,
}

/// One use of another top-level module of the same crate.
#[derive(Clone, Debug)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub file: PathBuf,
    pub line: usize,
}

/// A module tree: a crate's library or one of its binaries.
#[derive(Debug, Default)]
pub struct Tree {
    /// `crate-dir:lib` or `crate-dir:bin main`.
    pub name: String,
    pub root: PathBuf,
    pub files: Vec<PathBuf>,
    pub functions: Vec<Function>,
    /// Uses between top-level modules (the crate root itself is not a node).
    pub edges: Vec<Edge>,
}

impl Tree {
    /// Sets of top-level modules that use each other, directly or through others (strongly
    /// connected components with more than one module), each sorted.
    pub fn cycles(&self) -> Vec<Vec<String>> {
        let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for e in &self.edges {
            graph.entry(&e.from).or_default().insert(&e.to);
            graph.entry(&e.to).or_default();
        }
        strongly_connected(&graph)
            .into_iter()
            .filter(|c| c.len() > 1)
            .collect()
    }

    /// The edges inside one cycle, for the evidence.
    pub fn edges_within(&self, cycle: &[String]) -> Vec<&Edge> {
        let mut seen = BTreeSet::new();
        self.edges
            .iter()
            .filter(|e| cycle.contains(&e.from) && cycle.contains(&e.to))
            .filter(|e| seen.insert((e.from.clone(), e.to.clone())))
            .collect()
    }
}

/// An error reading the sources.
#[derive(Debug)]
pub struct HouseError(pub String);

impl std::fmt::Display for HouseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HouseError {}

/// The workspace root (the folder above this crate). Cargo's `CARGO_MANIFEST_DIR` of the run
/// first (`cargo run`, `cargo test` set it): a build reused from a clone of the workspace at
/// another place, sharing the target folder, would otherwise check that clone's sources.
pub fn workspace_root() -> PathBuf {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    dir.parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Every crate folder below `root` (a folder with a Cargo.toml and a src/), build output and
/// hidden folders left out.
pub fn crate_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if dir.join("Cargo.toml").is_file() && dir.join("src").is_dir() {
            out.push(dir.clone());
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() && !name.starts_with('.') && name != "target" && name != "src" {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The module trees of a crate: `src/lib.rs`, `src/main.rs`, `src/bin/*.rs` and
/// `examples/*.rs`, each with the files its `mod` items reach.
pub fn trees_of(crate_dir: &Path, root: &Path) -> Result<Vec<Tree>, HouseError> {
    let label = crate_dir
        .strip_prefix(root)
        .ok()
        .map(|p| p.display().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| ".".into());
    let mut roots = Vec::new();
    for f in ["src/lib.rs", "src/main.rs"] {
        let p = crate_dir.join(f);
        if p.is_file() {
            roots.push(p);
        }
    }
    for d in ["src/bin", "examples"] {
        if let Ok(rd) = std::fs::read_dir(crate_dir.join(d)) {
            let mut v: Vec<PathBuf> = rd
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "rs"))
                .collect();
            v.sort();
            roots.extend(v);
        }
    }
    roots
        .into_iter()
        .map(|r| {
            let name = format!(
                "{label}:{}",
                r.strip_prefix(crate_dir).unwrap_or(&r).display()
            );
            read_tree(name, &r)
        })
        .collect()
}

/// Every module tree of the workspace below `root`, test crates left out (`fuzz/`).
pub fn workspace(root: &Path) -> Result<Vec<Tree>, HouseError> {
    let mut out = Vec::new();
    for dir in crate_dirs(root) {
        if dir.components().any(|c| c.as_os_str() == "fuzz") {
            continue;
        }
        out.extend(trees_of(&dir, root)?);
    }
    Ok(out)
}

fn read_tree(name: String, root: &Path) -> Result<Tree, HouseError> {
    let mut tree = Tree {
        name,
        root: root.to_path_buf(),
        ..Tree::default()
    };
    let root_file = parse(root)?;
    // re-exports of the crate root: `crate::Name` means the module it comes from
    let mut reexports = BTreeMap::new();
    let mut top = BTreeSet::new();
    for item in &root_file.items {
        match item {
            syn::Item::Mod(m) if !is_test(&m.attrs) => {
                top.insert(m.ident.to_string());
            }
            syn::Item::Use(u) => {
                let mut paths = Vec::new();
                flatten_use(&u.tree, &mut Vec::new(), &mut paths);
                for (path, name) in paths {
                    if let Some(first) = path.first() {
                        reexports.insert(name, first.clone());
                    }
                }
            }
            _ => {}
        }
    }
    let ctx = Context { top, reexports };
    let mut stack = vec![(root.to_path_buf(), Vec::<String>::new(), root_file)];
    while let Some((file, module, ast)) = stack.pop() {
        let mut v = FileVisitor {
            ctx: &ctx,
            file: &file,
            module: module.clone(),
            impl_type: Vec::new(),
            functions: &mut tree.functions,
            edges: &mut tree.edges,
            children: Vec::new(),
        };
        v.visit_file(&ast);
        let children = std::mem::take(&mut v.children);
        for (child_module, child_name) in children {
            let inline = &child_module[module.len()..child_module.len() - 1];
            let path =
                child_file(&file, module.is_empty(), inline, &child_name).ok_or_else(|| {
                    HouseError(format!(
                        "{}: no file for `mod {}`",
                        file.display(),
                        child_name
                    ))
                })?;
            let ast = parse(&path)?;
            stack.push((path, child_module, ast));
        }
        tree.files.push(file);
    }
    tree.files.sort();
    tree.functions.sort_by_key(|f| std::cmp::Reverse(f.lines));
    Ok(tree)
}

/// The file of `mod name;` declared in `parent` (a crate root or `mod.rs` keeps its children
/// beside it, `a.rs` in `a/`), inside the inline modules `inline` of that file.
fn child_file(
    parent: &Path,
    parent_is_root: bool,
    inline: &[String],
    name: &str,
) -> Option<PathBuf> {
    let dir = parent.parent()?;
    let stem = parent.file_stem()?.to_string_lossy().into_owned();
    let mut base = if parent_is_root || stem == "mod" {
        dir.to_path_buf()
    } else {
        dir.join(&stem)
    };
    for m in inline {
        base = base.join(m);
    }
    [
        base.join(format!("{name}.rs")),
        base.join(name).join("mod.rs"),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

fn parse(path: &Path) -> Result<syn::File, HouseError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| HouseError(format!("{}: {e}", path.display())))?;
    syn::parse_file(&text).map_err(|e| {
        let at = e.span().start();
        HouseError(format!("{}:{}:{}: {e}", path.display(), at.line, at.column))
    })
}

/// `#[test]`, `#[cfg(test)]` (also inside `all(...)`/`any(...)`), `#[bench]`.
fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        let p = a.path();
        if p.is_ident("test") || p.is_ident("bench") {
            return true;
        }
        if p.is_ident("cfg") {
            if let syn::Meta::List(l) = &a.meta {
                let t = l.tokens.to_string();
                return t == "test"
                    || t.contains("test ,")
                    || t.ends_with("test")
                    || t.contains("(test");
            }
        }
        false
    })
}

/// Every path a `use` tree brings in, with the name it binds (`*` for globs).
fn flatten_use(
    tree: &syn::UseTree,
    prefix: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, String)>,
) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            flatten_use(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let mut v = prefix.clone();
            v.push(n.ident.to_string());
            out.push((v, n.ident.to_string()));
        }
        syn::UseTree::Rename(r) => {
            let mut v = prefix.clone();
            v.push(r.ident.to_string());
            out.push((v, r.rename.to_string()));
        }
        syn::UseTree::Glob(_) => out.push((prefix.clone(), "*".into())),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                flatten_use(t, prefix, out);
            }
        }
    }
}

struct Context {
    /// The crate's top-level modules.
    top: BTreeSet<String>,
    /// Names the crate root re-exports, and the top-level module each comes from.
    reexports: BTreeMap<String, String>,
}

struct FileVisitor<'a> {
    ctx: &'a Context,
    file: &'a Path,
    /// The module path of what is being visited (empty: the crate root).
    module: Vec<String>,
    impl_type: Vec<String>,
    functions: &'a mut Vec<Function>,
    edges: &'a mut Vec<Edge>,
    /// `mod name;` items found: (module path of the child, name).
    children: Vec<(Vec<String>, String)>,
}

impl FileVisitor<'_> {
    /// The top-level module a path (as written in this module) refers to, if it is another
    /// one of this crate.
    fn target(&self, segs: &[String]) -> Option<String> {
        let first = segs.first()?;
        let resolved: Vec<String> = match first.as_str() {
            "crate" => segs[1..].to_vec(),
            "super" => {
                let mut m = self.module.clone();
                let mut rest = segs;
                while rest.first().is_some_and(|s| s == "super") {
                    m.pop();
                    rest = &rest[1..];
                }
                m.extend(rest.iter().cloned());
                m
            }
            "self" => {
                let mut m = self.module.clone();
                m.extend(segs[1..].iter().cloned());
                m
            }
            // a bare path in the crate root names its own modules
            _ if self.module.is_empty() => segs.to_vec(),
            _ => return None,
        };
        let head = resolved.first()?;
        let top = if self.ctx.top.contains(head) {
            head.clone()
        } else {
            self.ctx.reexports.get(head)?.clone()
        };
        let own = self.module.first()?;
        (top != *own && self.ctx.top.contains(&top)).then_some(top)
    }

    fn record(&mut self, segs: &[String], span: Span) {
        if let Some(to) = self.target(segs) {
            if let Some(from) = self.module.first() {
                self.edges.push(Edge {
                    from: from.clone(),
                    to,
                    file: self.file.to_path_buf(),
                    line: span.start().line,
                });
            }
        }
    }

    fn function(&mut self, name: &str, sig: &syn::Signature, block: &syn::Block) {
        let start = sig.fn_token.span.start().line;
        let end = block.brace_token.span.close().end().line;
        let name = match self.impl_type.last() {
            Some(t) => format!("{t}::{name}"),
            None => name.to_string(),
        };
        self.functions.push(Function {
            name,
            file: self.file.to_path_buf(),
            line: start,
            lines: end.saturating_sub(start) + 1,
        });
    }
}

impl<'ast> Visit<'ast> for FileVisitor<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if is_test(&m.attrs) {
            return;
        }
        let mut child = self.module.clone();
        child.push(m.ident.to_string());
        match &m.content {
            None => self.children.push((child, m.ident.to_string())),
            Some((_, items)) => {
                let saved = std::mem::replace(&mut self.module, child);
                for i in items {
                    self.visit_item(i);
                }
                self.module = saved;
            }
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if is_test(&f.attrs) {
            return;
        }
        self.function(&f.sig.ident.to_string(), &f.sig, &f.block);
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if is_test(&i.attrs) {
            return;
        }
        let t = match &*i.self_ty {
            syn::Type::Path(p) => p
                .path
                .segments
                .last()
                .map(|s| s.ident.to_string())
                .unwrap_or_default(),
            _ => "_".into(),
        };
        self.impl_type.push(t);
        syn::visit::visit_item_impl(self, i);
        self.impl_type.pop();
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if is_test(&f.attrs) {
            return;
        }
        self.function(&f.sig.ident.to_string(), &f.sig, &f.block);
        syn::visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(b) = &f.default {
            self.function(&f.sig.ident.to_string(), &f.sig, b);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut paths = Vec::new();
        flatten_use(&u.tree, &mut Vec::new(), &mut paths);
        let span = u.use_token.span;
        for (p, _) in paths {
            self.record(&p, span);
        }
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        // macro arguments are tokens, not syntax: look for `crate::a::b` / `super::a` in them
        let mut flat = Vec::new();
        flatten_tokens(m.tokens.clone(), &mut flat);
        let mut i = 0;
        while i < flat.len() {
            if let proc_macro2::TokenTree::Ident(id) = &flat[i] {
                let name = id.to_string();
                if name == "crate" || name == "super" || name == "self" {
                    let mut segs = vec![name];
                    let mut j = i + 1;
                    while j + 2 < flat.len() && is_colon(&flat[j]) && is_colon(&flat[j + 1]) {
                        match &flat[j + 2] {
                            proc_macro2::TokenTree::Ident(next) => segs.push(next.to_string()),
                            _ => break,
                        }
                        j += 3;
                    }
                    if segs.len() > 1 {
                        self.record(&segs, id.span());
                    }
                    i = j;
                    continue;
                }
            }
            i += 1;
        }
        syn::visit::visit_macro(self, m);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if segs.len() > 1 {
            let span = p
                .segments
                .first()
                .map(|s| s.ident.span())
                .unwrap_or_else(Span::call_site);
            self.record(&segs, span);
        }
        syn::visit::visit_path(self, p);
    }
}

fn flatten_tokens(ts: proc_macro2::TokenStream, out: &mut Vec<proc_macro2::TokenTree>) {
    for t in ts {
        match t {
            proc_macro2::TokenTree::Group(g) => flatten_tokens(g.stream(), out),
            other => out.push(other),
        }
    }
}

fn is_colon(t: &proc_macro2::TokenTree) -> bool {
    matches!(t, proc_macro2::TokenTree::Punct(p) if p.as_char() == ':')
}

/// Tarjan's strongly connected components.
fn strongly_connected(graph: &BTreeMap<&str, BTreeSet<&str>>) -> Vec<Vec<String>> {
    struct State<'a> {
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        on_stack: BTreeSet<&'a str>,
        stack: Vec<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(v: &'a str, g: &BTreeMap<&'a str, BTreeSet<&'a str>>, s: &mut State<'a>) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in g.get(v).into_iter().flatten() {
            if !s.index.contains_key(w) {
                visit(w, g, s);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            comp.sort();
            s.out.push(comp);
        }
    }
    let mut s = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        on_stack: BTreeSet::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for &v in graph.keys() {
        if !s.index.contains_key(v) {
            visit(v, graph, &mut s);
        }
    }
    s.out
}

/// Lines of a file.
pub fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}
