//! Chat through llama.cpp's own chat layer (the C++ shim over `common/chat.h`): prompts are
//! the Jinja rendering of the file's template, a template with tool calls gives llama.cpp's
//! grammar, triggers and parser, and the parser reads answers back, whole and as they grow.

use drllm_engine::{ChatInput, ChatMessage, ChatTemplates, Tokenizer, ToolChoice};
use drllm_testkit::{write_tiny_model, Family, TinySpec};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn tiny(dir: &Path) -> PathBuf {
    let mut spec = TinySpec::default_for(Family::Llama);
    spec.with_chat_template = true;
    let p = dir.join("tiny.gguf");
    write_tiny_model(&spec, &p).unwrap();
    p
}

/// The repository (cargo's run-time `CARGO_MANIFEST_DIR` first: a test binary reused from a
/// clone elsewhere that shares the target folder would read that clone's files).
fn repo() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn tool_template() -> String {
    std::fs::read_to_string(repo().join("templates/chatml-tools.jinja")).unwrap()
}

fn weather() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

#[test]
fn chat_prompts_are_the_jinja_rendering_of_the_files_template() {
    let dir = tempfile::tempdir().unwrap();
    let tok = Tokenizer::load(tiny(dir.path())).unwrap();
    let msgs = [
        ChatMessage::new("system", "be brief"),
        ChatMessage::new("user", "the cat"),
    ];
    assert_eq!(
        tok.apply_chat(&msgs, true).unwrap(),
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(!tok.chat().unwrap().calls_tools().unwrap());
    // SmolLM2's template opens with a default system turn when the chat has none: llama.cpp's
    // Jinja engine renders it (its older built-in ChatML formatter did not)
    if let Some(p) = drllm_testkit::real_model("SmolLM2-135M-Instruct.Q4_1.gguf") {
        let tok = Tokenizer::load(&p).unwrap();
        let text = tok
            .apply_chat(&[ChatMessage::new("user", "Hi")], true)
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}

#[test]
fn the_tool_template_gives_llama_cpps_grammar_triggers_and_parser() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny(dir.path());
    let t = ChatTemplates::open(&model, Some(&tool_template())).unwrap();
    let caps = t.caps().unwrap();
    assert!(
        caps["supports_tools"] && caps["supports_tool_calls"],
        "{caps:?}"
    );
    let msgs = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let tools = weather();
    let mut input = ChatInput::messages(&msgs);
    input.tools = Some(&tools);
    // auto: a lazy grammar, woken by the call's opening tag (a regex of the escaped word)
    let auto = t.apply(&input).unwrap();
    assert!(
        auto.prompt.contains("<tools>\n{\"type\": \"function\""),
        "{}",
        auto.prompt
    );
    assert!(auto.prompt.ends_with("<|im_start|>assistant\n"));
    assert!(auto.grammar_lazy && auto.grammar.contains("get_weather"));
    assert_eq!(auto.grammar_triggers.len(), 1);
    assert_eq!(auto.grammar_triggers[0].value, "<tool_call>\n");
    assert_eq!(auto.trigger_patterns, ["<tool_call>\n"]);
    assert!(auto.grammar_prefill_tokens.is_empty());
    // required: strict, starting with the generation prompt, which the grammar accepts first;
    // an answer prefix goes after the prompt and into that prefill
    input.tool_choice = ToolChoice::Required;
    input.answer_prefix = "<tool_call>\n";
    let req = t.apply(&input).unwrap();
    assert!(
        !req.grammar_lazy
            && req
                .grammar
                .contains("root ::= \"<|im_start|>assistant\\n\"")
    );
    assert_eq!(req.prompt, format!("{}<tool_call>\n", auto.prompt));
    let tok = Tokenizer::load(&model).unwrap();
    assert_eq!(
        req.grammar_prefill_tokens,
        tok.tokenize("<|im_start|>assistant\n<tool_call>\n", false, true),
        "the prefill is the generation prompt and the prefix"
    );
    // tool_choice none: no grammar
    input.tool_choice = ToolChoice::None;
    input.answer_prefix = "";
    assert!(t.apply(&input).unwrap().grammar.is_empty());

    // the parser reads a call back, and as the text grows its diffs add up to the call
    let answer = "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    let mut p = t.parser(&auto, true).unwrap();
    let (mut content, mut args, mut names) = (String::new(), String::new(), Vec::new());
    let mut cut = 0;
    while cut < answer.len() {
        cut = (cut + 7).min(answer.len());
        while !answer.is_char_boundary(cut) {
            cut += 1;
        }
        let (_, diffs) = p.feed(&answer[..cut], cut < answer.len()).unwrap();
        for d in diffs {
            content.push_str(&d.content_delta);
            if d.tool_call_index >= 0 {
                args.push_str(&d.tool_call.arguments);
                if !d.tool_call.name.is_empty() {
                    names.push(d.tool_call.name.clone());
                }
            }
        }
    }
    let (msg, _) = t.parser(&auto, true).unwrap().feed(answer, false).unwrap();
    assert_eq!(msg.content.trim_end(), "Let me look.");
    assert_eq!(msg.tool_calls.len(), 1);
    assert_eq!(msg.tool_calls[0].name, "get_weather");
    let parsed: Value = serde_json::from_str(&msg.tool_calls[0].arguments).unwrap();
    assert_eq!(parsed, json!({"city": "Paris"}));
    assert_eq!(content, msg.content);
    assert_eq!(args, msg.tool_calls[0].arguments);
    assert_eq!(names, ["get_weather"]);
    // without tools, the same text is content
    let plain = t.apply(&ChatInput::messages(&msgs)).unwrap();
    let (msg, _) = t
        .parser(&plain, false)
        .unwrap()
        .feed(answer, false)
        .unwrap();
    assert_eq!((msg.content.as_str(), msg.tool_calls.len()), (answer, 0));
}

#[test]
fn malformed_conversations_get_llama_cpps_reason() {
    let dir = tempfile::tempdir().unwrap();
    let t = ChatTemplates::open(&tiny(dir.path()), Some(&tool_template())).unwrap();
    let bad = json!([{"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]}]);
    let e = t.apply(&ChatInput::messages(&bad)).unwrap_err();
    assert!(e.0.contains("Missing tool call name"), "{e}");
    let e = ChatTemplates::open(&tiny(dir.path()), Some("{% for %}")).unwrap_err();
    assert!(
        e.0.starts_with("the Jinja template does not parse: "),
        "{e}"
    );
    assert!(
        e.0.len() > "the Jinja template does not parse: ".len() + 3,
        "{e}"
    );
}

#[test]
fn the_tool_call_limit_sees_a_second_call_begin() {
    let dir = tempfile::tempdir().unwrap();
    let t = ChatTemplates::open(&tiny(dir.path()), Some(&tool_template())).unwrap();
    let msgs = json!([{"role": "user", "content": "weather?"}]);
    let tools = weather();
    let mut input = ChatInput::messages(&msgs);
    input.tools = Some(&tools);
    let limit = drllm_engine::ToolCallLimit {
        chat: std::sync::Arc::new(t.apply(&input).unwrap()),
        answer_prefix: String::new(),
        max_calls: 1,
    };
    let one = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
    assert!(!limit.exceeded_by(&one[..30]).unwrap());
    assert!(!limit.exceeded_by(one).unwrap());
    assert!(!limit.exceeded_by(&format!("{one}\n")).unwrap());
    // a second call counts once llama.cpp's parser has its name
    assert!(!limit
        .exceeded_by(&format!("{one}\n<tool_call>\n{{\"na"))
        .unwrap());
    let second = format!("{one}\n<tool_call>\n{{\"name\": \"get_weather\", \"arguments\": {{");
    assert!(limit.exceeded_by(&second).unwrap());
    // the answer prefix counts as the answer's start
    let prefixed = drllm_engine::ToolCallLimit {
        answer_prefix: "<tool_call>\n".into(),
        ..limit.clone()
    };
    assert!(prefixed
        .exceeded_by(&second["<tool_call>\n".len()..])
        .unwrap());
}
