//! Constrained generation: GBNF grammars (llama.cpp's format, root rule `root`) and JSON
//! schemas (turned into GBNF by llama.cpp's converter), enforced while sampling by llama.cpp's
//! grammar sampler.
//!
//! llama.cpp reports why a grammar does not compile on stderr, not to its caller; so when it
//! refuses one, [`explain`] looks for the first syntax error itself (position and what was
//! expected) to put in the error, falling back to what llama.cpp logged.

use std::cell::RefCell;

/// A grammar that llama.cpp compiled against a vocabulary (see [`crate::Tokenizer::grammar`]
/// and [`crate::Tokenizer::chat_grammar`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grammar {
    gbnf: String,
    /// Lazy: enforced only from a trigger on (tool_choice auto).
    pub(crate) lazy: Option<Triggers>,
    /// Tokens the grammar accepts before the first sampled one (a tool-call grammar that
    /// starts with the generation prompt).
    pub(crate) prefill: Vec<i32>,
}

/// What wakes a lazy grammar: text matching one of the regexes, or one of the tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Triggers {
    pub patterns: Vec<String>,
    pub tokens: Vec<i32>,
}

impl Grammar {
    pub(crate) fn new(gbnf: String) -> Grammar {
        Grammar {
            gbnf,
            lazy: None,
            prefill: Vec::new(),
        }
    }

    /// The GBNF text.
    pub fn gbnf(&self) -> &str {
        &self.gbnf
    }

    /// Whether it waits for a trigger.
    pub fn is_lazy(&self) -> bool {
        self.lazy.is_some()
    }
}

/// Why a grammar or a schema was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrammarError(pub String);

impl std::fmt::Display for GrammarError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GrammarError {}

/// GBNF for a JSON schema (llama.cpp's converter). The schema must be JSON text.
pub fn json_schema_to_gbnf(schema: &str) -> Result<String, GrammarError> {
    llama_cpp_2::json_schema_to_grammar(schema).map_err(|_| {
        GrammarError(
            "llama.cpp's JSON-schema converter refused the schema (a keyword or type it does \
             not support, or something that is not a JSON schema)"
                .into(),
        )
    })
}

thread_local! {
    /// llama.cpp error log lines captured on this thread (while compiling a grammar).
    static CAPTURE: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Called by the log filter: keeps an error line if this thread is capturing.
pub(crate) fn captured(line: &str) -> bool {
    CAPTURE.with(|c| match c.borrow_mut().as_mut() {
        Some(v) => {
            v.push(line.trim().to_string());
            true
        }
        None => false,
    })
}

/// Runs `f` with llama.cpp's error log lines of this thread collected.
pub(crate) fn capturing<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    CAPTURE.with(|c| *c.borrow_mut() = Some(Vec::new()));
    let out = f();
    let lines = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (out, lines)
}

/// Why llama.cpp refused `gbnf`: the first syntax error found here, else what it logged.
pub(crate) fn explain(gbnf: &str, logged: &[String]) -> GrammarError {
    if let Err(e) = check_syntax(gbnf) {
        return GrammarError(e);
    }
    let logged: Vec<&str> = logged
        .iter()
        .map(String::as_str)
        .filter(|l| !l.is_empty())
        .collect();
    if logged.is_empty() {
        GrammarError("llama.cpp could not compile the grammar".into())
    } else {
        GrammarError(format!("llama.cpp: {}", logged.join("; ")))
    }
}

/// A syntax check of GBNF that follows llama.cpp's parser: rules `name ::= alternatives`, one
/// per line (newlines allowed inside parentheses and after `::=` and `|`), terms `"literal"`,
/// `[class]`, `.`, rule names, `( ... )`, `<token>`, each optionally followed by `*`, `+`, `?`
/// or `{m}`, `{m,}`, `{m,n}`; comments from `#` to the end of the line. Then: every referenced
/// rule defined, a `root` rule present. Errors give line and column.
pub(crate) fn check_syntax(src: &str) -> Result<(), String> {
    let mut p = Parser {
        s: src.as_bytes(),
        i: 0,
        src,
    };
    let mut defined = Vec::new();
    let mut used: Vec<(String, usize)> = Vec::new();
    p.space(true);
    while p.i < p.s.len() {
        let at = p.i;
        let name = p.name().ok_or_else(|| p.err(at, "expected a rule name"))?;
        p.space(false);
        if !p.eat("::=") {
            return Err(p.err(p.i, &format!("expected '::=' after rule name '{name}'")));
        }
        p.space(true);
        p.alternatives(false, &mut used)?;
        defined.push(name);
        // a rule ends at a newline (or the end)
        if p.i < p.s.len() {
            if p.s[p.i] == b'\r' || p.s[p.i] == b'\n' {
                p.space(true);
            } else {
                return Err(p.err(p.i, "expected a newline or the end of the grammar"));
            }
        }
    }
    for (name, at) in used {
        if !defined.contains(&name) {
            return Err(p.err(at, &format!("rule '{name}' is used but not defined")));
        }
    }
    if !defined.iter().any(|d| d == "root") {
        return Err("the grammar has no 'root' rule (generation starts there)".into());
    }
    Ok(())
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    src: &'a str,
}

impl Parser<'_> {
    fn err(&self, at: usize, what: &str) -> String {
        let before = &self.src[..at.min(self.src.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        let near: String = self.src[at.min(self.src.len())..]
            .chars()
            .take(20)
            .collect();
        if near.is_empty() {
            format!("grammar line {line}, column {col}: {what} (at the end)")
        } else {
            format!("grammar line {line}, column {col}: {what} (at '{near}')")
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, t: &str) -> bool {
        if self.s[self.i..].starts_with(t.as_bytes()) {
            self.i += t.len();
            true
        } else {
            false
        }
    }

    /// Spaces, tabs and comments; newlines too when `newlines`.
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' => self.i += 1,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n' && c != b'\r') {
                        self.i += 1;
                    }
                }
                b'\r' | b'\n' if newlines => self.i += 1,
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            self.i += 1;
        }
        (self.i > start).then(|| self.src[start..self.i].to_string())
    }

    fn alternatives(
        &mut self,
        nested: bool,
        used: &mut Vec<(String, usize)>,
    ) -> Result<(), String> {
        self.sequence(nested, used)?;
        while self.peek() == Some(b'|') {
            self.i += 1;
            self.space(true);
            self.sequence(nested, used)?;
        }
        Ok(())
    }

    fn sequence(&mut self, nested: bool, used: &mut Vec<(String, usize)>) -> Result<(), String> {
        let mut terms = 0;
        loop {
            let at = self.i;
            match self.peek() {
                Some(b'"') => self.literal(b'"')?,
                Some(b'[') => self.class()?,
                Some(b'.') => self.i += 1,
                Some(b'(') => {
                    self.i += 1;
                    self.space(true);
                    self.alternatives(true, used)?;
                    if self.peek() != Some(b')') {
                        return Err(self.err(self.i, "expected ')'"));
                    }
                    self.i += 1;
                }
                Some(b'<') | Some(b'!') => {
                    self.eat("!");
                    if !self.eat("<") {
                        return Err(self.err(self.i, "expected '<' of a token"));
                    }
                    while self.peek().is_some_and(|c| c != b'>') {
                        self.i += 1;
                    }
                    if !self.eat(">") {
                        return Err(self.err(at, "unterminated token '<...>'"));
                    }
                }
                Some(c) if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' => {
                    let name = self.name().unwrap_or_default();
                    // a name followed by ::= starts the next rule: this sequence is over
                    let save = self.i;
                    self.space(false);
                    if self.s[self.i..].starts_with(b"::=") {
                        return Err(self.err(
                            at,
                            "a new rule must start on its own line (missing newline before it?)",
                        ));
                    }
                    self.i = save;
                    used.push((name, at));
                }
                Some(b'*') | Some(b'+') | Some(b'?') | Some(b'{') => {
                    return Err(self.err(at, "a repetition operator must follow a term"));
                }
                _ => break,
            }
            terms += 1;
            self.space(nested);
            // postfix operators
            match self.peek() {
                Some(b'*') | Some(b'+') | Some(b'?') => {
                    self.i += 1;
                    self.space(nested);
                }
                Some(b'{') => {
                    let at = self.i;
                    self.i += 1;
                    self.space(nested);
                    let m = self.int();
                    self.space(nested);
                    if m.is_none() {
                        return Err(self.err(at, "expected a number after '{'"));
                    }
                    if self.eat(",") {
                        self.space(nested);
                        let _ = self.int();
                        self.space(nested);
                    }
                    if !self.eat("}") {
                        return Err(self.err(at, "expected '}' closing a repetition"));
                    }
                    self.space(nested);
                }
                _ => {}
            }
        }
        let _ = terms;
        Ok(())
    }

    fn int(&mut self) -> Option<u64> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        self.src[start..self.i].parse().ok()
    }

    fn escape(&mut self) -> Result<(), String> {
        let at = self.i;
        self.i += 1; // the backslash
        let n = match self.peek() {
            Some(b'x') => 2,
            Some(b'u') => 4,
            Some(b'U') => 8,
            Some(b't' | b'r' | b'n' | b'\\' | b'"' | b'[' | b']') => 0,
            _ => return Err(self.err(at, "unknown escape")),
        };
        self.i += 1;
        for _ in 0..n {
            if !self.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
                return Err(self.err(at, "expected hexadecimal digits in the escape"));
            }
            self.i += 1;
        }
        Ok(())
    }

    fn literal(&mut self, close: u8) -> Result<(), String> {
        let at = self.i;
        self.i += 1;
        loop {
            match self.peek() {
                None | Some(b'\n') | Some(b'\r') => {
                    return Err(self.err(at, "unterminated string literal"))
                }
                Some(b'\\') => self.escape()?,
                Some(c) if c == close => {
                    self.i += 1;
                    return Ok(());
                }
                Some(_) => self.i += 1,
            }
        }
    }

    fn class(&mut self) -> Result<(), String> {
        let at = self.i;
        self.i += 1;
        self.eat("^");
        loop {
            match self.peek() {
                None | Some(b'\n') | Some(b'\r') => {
                    return Err(self.err(at, "unterminated character class '['"))
                }
                Some(b'\\') => self.escape()?,
                Some(b']') => {
                    self.i += 1;
                    return Ok(());
                }
                Some(_) => self.i += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_grammars_pass_and_bad_ones_are_located() {
        for good in [
            "root ::= \"yes\" | \"no\"",
            "root ::= item+\nitem ::= [a-z]{1,3} \" \"? # comment\n",
            "# leading comment\nroot ::= (\n  \"a\"\n  | \"b\"\n)*\n",
            "root ::= \"\\x41\\u00e9\" [^\\]] .",
        ] {
            assert_eq!(check_syntax(good), Ok(()), "{good}");
        }
        for (bad, what) in [
            ("root := \"a\"", "expected '::='"),
            ("root ::= \"a", "unterminated string"),
            ("root ::= [a-z", "unterminated character class"),
            ("root ::= thing", "rule 'thing' is used but not defined"),
            ("start ::= \"a\"", "no 'root' rule"),
            ("root ::= (\"a\" | \"b\"", "expected ')'"),
            ("root ::= \"a\"{2", "expected '}'"),
            ("root ::= * \"a\"", "must follow a term"),
            ("root ::= \"a\" )", "expected a newline"),
            ("root ::= \"\\q\"", "unknown escape"),
        ] {
            let e = check_syntax(bad).unwrap_err();
            assert!(e.contains(what), "{bad}: {e}");
        }
        let e = check_syntax("root ::= \"a\"\nitem ::= \"b\" (").unwrap_err();
        assert!(e.starts_with("grammar line 2, column "), "{e}");
    }
}
