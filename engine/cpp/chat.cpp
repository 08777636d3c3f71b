// drllm's shim over llama.cpp's chat layer (common/chat.h): Jinja chat templates from the
// GGUF, tools and tool_choice turned into a prompt, a grammar and its lazy triggers, and the
// model's output parsed back into content, reasoning and tool calls. Compiled against the
// llama.cpp sources that llama-cpp-sys-2 builds (and links, as libllama-common), the way
// llama-cpp-sys-2's own wrapper_common.cpp is. Everything crosses the C boundary as JSON
// text; every C++ exception is caught here and returned as an error string.

#include "chat.h"
#include "common.h"
#include "json.h"
#include "llama.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <stdexcept>
#include <cstring>
#include <string>
#include <vector>

namespace {

char * dup_string(const std::string & s) {
    char * out = static_cast<char *>(std::malloc(s.size() + 1));
    if (out) {
        std::memcpy(out, s.data(), s.size());
        out[s.size()] = '\0';
    }
    return out;
}

void set_error(char ** err, const std::string & what) {
    if (err) {
        *err = dup_string(what);
    }
}

const char * trigger_type_name(common_grammar_trigger_type t) {
    switch (t) {
        case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
            return "token";
        case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:
            return "word";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
            return "pattern";
        case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL:
            return "pattern_full";
    }
    return "unknown";
}

common_json tool_call_json(const common_chat_tool_call & tc) {
    common_json o = common_json::object();
    o["name"]      = tc.name;
    o["arguments"] = tc.arguments;
    o["id"]        = tc.id;
    return o;
}

common_json msg_json(const common_chat_msg & m) {
    common_json o          = common_json::object();
    o["content"]           = m.content;
    o["reasoning_content"] = m.reasoning_content;
    common_json calls      = common_json::array();
    for (const auto & tc : m.tool_calls) {
        calls.push_back(tool_call_json(tc));
    }
    o["tool_calls"] = calls;
    return o;
}

// What llama-server and common_sampler_init make of a chat's grammar for the sampler, added
// to `out`: single-token preserved texts as token ids (rendered as text when generated); the
// lazy grammar's triggers as regex patterns and tokens (a trigger word that is one preserved
// token becomes a token trigger, as llama-server does; words are regex-escaped and full
// patterns anchored, as common_sampler_init does); and the generation prompt's tokens that a
// strict tool-call grammar accepts before the first sampled token (common_sampler_init's
// prefill, without a tokenizer's leading-space token), followed by `answer_prefix` (text the
// answer is made to start with, at the end of the prompt).
void sampling_inputs(const llama_model * model, const common_chat_params & p, const std::string & answer_prefix,
                     common_json & out) {
    const llama_vocab * vocab = llama_model_get_vocab(model);
    std::vector<llama_token> preserved;
    for (const auto & t : p.preserved_tokens) {
        auto ids = common_tokenize(vocab, t, false, true);
        if (ids.size() == 1) {
            preserved.push_back(ids[0]);
        }
    }
    common_json preserved_ids = common_json::array();
    for (auto t : preserved) {
        preserved_ids.push_back(static_cast<int64_t>(t));
    }
    out["preserved_token_ids"] = preserved_ids;

    common_json patterns = common_json::array();
    common_json tokens   = common_json::array();
    for (const auto & t : p.grammar_triggers) {
        switch (t.type) {
            case COMMON_GRAMMAR_TRIGGER_TYPE_WORD: {
                auto ids = common_tokenize(vocab, t.value, false, true);
                if (ids.size() == 1) {
                    if (std::find(preserved.begin(), preserved.end(), ids[0]) == preserved.end()) {
                        throw std::runtime_error("grammar trigger word should be marked as preserved token: " + t.value);
                    }
                    tokens.push_back(static_cast<int64_t>(ids[0]));
                } else {
                    patterns.push_back(regex_escape(t.value));
                }
                break;
            }
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
                patterns.push_back(t.value);
                break;
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: {
                std::string anchored = "^$";
                if (!t.value.empty()) {
                    anchored = (t.value.front() != '^' ? "^" : "") + t.value + (t.value.back() != '$' ? "$" : "");
                }
                patterns.push_back(anchored);
                break;
            }
            case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
                tokens.push_back(static_cast<int64_t>(t.token));
                break;
        }
    }
    out["trigger_patterns"] = patterns;
    out["trigger_tokens"]   = tokens;

    common_json prefill = common_json::array();
    const std::string opening = p.generation_prompt + answer_prefix;
    if (!p.grammar.empty() && !p.grammar_lazy && !opening.empty()) {
        auto ids = common_tokenize(vocab, opening, false, true);
        for (size_t i = 0; i < ids.size(); i++) {
            std::string piece = common_token_to_piece(vocab, ids[i], true);
            if (i == 0 && !piece.empty() && std::isspace(static_cast<unsigned char>(piece[0])) &&
                !std::isspace(static_cast<unsigned char>(opening[0]))) {
                continue;
            }
            prefill.push_back(static_cast<int64_t>(ids[i]));
        }
    }
    out["grammar_prefill_tokens"] = prefill;
}

}  // namespace

struct drllm_chat {
    llama_model *             model = nullptr;
    common_chat_templates_ptr templates;
};

struct drllm_chat_parser {
    common_chat_parser_params params;
    common_chat_msg           previous;
};

extern "C" {

void drllm_chat_string_free(char * s) {
    std::free(s);
}

// Loads the vocabulary of the GGUF at `path` (llama.cpp's loader; the backend must be
// initialised) and its chat templates, as llama-server does; `template_override` (Jinja
// source, empty for none) replaces the file's, as llama-server's --chat-template-file does.
drllm_chat * drllm_chat_open(const char * path, const char * template_override, char ** err) {
    const std::string tmpl = template_override ? template_override : "";
    if (!tmpl.empty()) {
        // parsed here first for the message: common_chat_templates_init rethrows a parse error
        // as a plain std::exception
        try {
            jinja::lexer lexer;
            auto         tokens = lexer.tokenize(tmpl);
            (void) jinja::parse_from_tokens(tokens);
        } catch (const std::exception & e) {
            set_error(err, std::string("the Jinja template does not parse: ") + e.what());
            return nullptr;
        } catch (...) {
            set_error(err, "the Jinja template does not parse");
            return nullptr;
        }
    }
    llama_model * model = nullptr;
    try {
        llama_model_params mp = llama_model_default_params();
        mp.vocab_only         = true;
        model                 = llama_model_load_from_file(path, mp);
        if (!model) {
            set_error(err, std::string("llama.cpp could not load the vocabulary of ") + path);
            return nullptr;
        }
        common_chat_templates_ptr templates = common_chat_templates_init(model, tmpl);
        auto * chat                         = new drllm_chat();
        chat->model                         = model;
        chat->templates                     = std::move(templates);
        return chat;
    } catch (const std::exception & e) {
        set_error(err, std::string("the chat template: ") + e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception while reading the chat template");
    }
    llama_model_free(model);
    return nullptr;
}

void drllm_chat_free(drllm_chat * chat) {
    if (chat) {
        chat->templates.reset();
        llama_model_free(chat->model);
        delete chat;
    }
}

// The template's source (the default one, or `variant`, e.g. "tool_use"); empty if none.
char * drllm_chat_template_source(const drllm_chat * chat, const char * variant, char ** err) {
    try {
        return dup_string(common_chat_templates_source(chat->templates.get(), variant ? variant : ""));
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception");
    }
    return nullptr;
}

// The template's capabilities (jinja::caps: supports_tools, supports_tool_calls, ...) as a
// JSON object of booleans.
char * drllm_chat_caps(const drllm_chat * chat, char ** err) {
    try {
        common_json out = common_json::object();
        for (const auto & kv : common_chat_templates_get_caps(chat->templates.get())) {
            out[kv.first] = kv.second;
        }
        return dup_string(out.dump());
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception");
    }
    return nullptr;
}

// Applies the chat template. `request` is JSON: {"messages": [OpenAI messages], "tools":
// [OpenAI tools] (optional), "tool_choice": "auto" | "none" | "required", "parallel_tool_calls":
// bool, "add_generation_prompt": bool, "enable_thinking": bool, "answer_prefix": text put after
// the prompt that a strict grammar accepts before sampling}. Returns JSON: the prompt, the
// grammar with its laziness and triggers, the preserved tokens, the extra stop strings, the
// generation prompt, the output format and the serialised output parser.
char * drllm_chat_apply(const drllm_chat * chat, const char * request, char ** err) {
    try {
        common_json req = common_json::parse(request);
        common_chat_templates_inputs in;
        in.messages = common_chat_msgs_parse_oaicompat(req.at("messages"));
        if (req.contains("tools") && !req.at("tools").is_null()) {
            in.tools = common_chat_tools_parse_oaicompat(req.at("tools"));
        }
        in.tool_choice = common_chat_tool_choice_parse_oaicompat(req.value("tool_choice", std::string("auto")));
        in.parallel_tool_calls   = req.value("parallel_tool_calls", false);
        in.add_generation_prompt = req.value("add_generation_prompt", true);
        in.enable_thinking       = req.value("enable_thinking", true);
        in.reasoning_format      = COMMON_REASONING_FORMAT_DEEPSEEK;
        in.use_jinja             = req.value("use_jinja", true);

        common_chat_params p = common_chat_templates_apply(chat->templates.get(), in);
        const std::string answer_prefix = req.value("answer_prefix", std::string());
        p.prompt += answer_prefix;

        common_json out          = common_json::object();
        out["prompt"]            = p.prompt;
        out["grammar"]           = p.grammar;
        out["grammar_lazy"]      = p.grammar_lazy;
        out["generation_prompt"] = p.generation_prompt;
        out["format"]            = static_cast<int>(p.format);
        out["format_name"]       = std::string(common_chat_format_name(p.format));
        out["parser"]            = p.parser;
        out["supports_thinking"]  = p.supports_thinking;
        out["thinking_start_tag"] = p.thinking_start_tag;
        common_json end_tags      = common_json::array();
        for (const auto & t : p.thinking_end_tags) {
            end_tags.push_back(t);
        }
        out["thinking_end_tags"] = end_tags;
        common_json triggers     = common_json::array();
        for (const auto & t : p.grammar_triggers) {
            common_json o = common_json::object();
            o["type"]     = std::string(trigger_type_name(t.type));
            o["value"]    = t.value;
            o["token"]    = static_cast<int64_t>(t.token);
            triggers.push_back(o);
        }
        out["grammar_triggers"] = triggers;
        common_json preserved   = common_json::array();
        for (const auto & s : p.preserved_tokens) {
            preserved.push_back(s);
        }
        out["preserved_tokens"] = preserved;
        common_json stops       = common_json::array();
        for (const auto & s : p.additional_stops) {
            stops.push_back(s);
        }
        out["additional_stops"] = stops;
        sampling_inputs(chat->model, p, answer_prefix, out);
        return dup_string(out.dump());
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception while applying the chat template");
    }
    return nullptr;
}

// A parser for one answer, from what drllm_chat_apply returned: `format`, `generation_prompt`
// and `parser`; `parse_tool_calls` when the request had tools.
drllm_chat_parser * drllm_chat_parser_new(int format, const char * generation_prompt, const char * parser,
                                          bool parse_tool_calls, char ** err) {
    try {
        if (format < 0 || format >= COMMON_CHAT_FORMAT_COUNT) {
            set_error(err, "unknown chat format " + std::to_string(format));
            return nullptr;
        }
        auto * p                     = new drllm_chat_parser();
        p->params.format             = static_cast<common_chat_format>(format);
        p->params.generation_prompt  = generation_prompt;
        p->params.reasoning_format   = COMMON_REASONING_FORMAT_DEEPSEEK;
        p->params.parse_tool_calls   = parse_tool_calls;
        if (parser && *parser) {
            p->params.parser.load(parser);
        }
        p->previous.role = "assistant";
        return p;
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception while loading the chat parser");
    }
    return nullptr;
}

void drllm_chat_parser_free(drllm_chat_parser * p) {
    delete p;
}

// Parses the whole text generated so far (`partial` while generation goes on). Returns JSON:
// {"message": {content, reasoning_content, tool_calls: [{name, arguments, id}]}, "diffs":
// [{content_delta, reasoning_content_delta, tool_call_index (-1: none), tool_call: {...}}]},
// the diffs being against the message the previous call returned (llama.cpp's
// common_chat_msg_diff, as llama-server streams them).
char * drllm_chat_parser_feed(drllm_chat_parser * p, const char * text, bool partial, char ** err) {
    try {
        common_chat_msg msg = common_chat_parse(text, partial, p->params);
        msg.role            = "assistant";
        common_json diffs   = common_json::array();
        std::string diff_error;
        try {
            for (const auto & d : common_chat_msg_diff::compute_diffs(p->previous, msg)) {
                common_json o                = common_json::object();
                o["content_delta"]           = d.content_delta;
                o["reasoning_content_delta"] = d.reasoning_content_delta;
                o["tool_call_index"]         = d.tool_call_index == std::string::npos ?
                                                   static_cast<int64_t>(-1) :
                                                   static_cast<int64_t>(d.tool_call_index);
                o["tool_call"]               = tool_call_json(d.tool_call_delta);
                diffs.push_back(o);
            }
        } catch (const std::exception & e) {
            // the new parse does not extend the previous one (llama.cpp refuses to diff): the
            // message still stands, and the next diff is against it
            diffs      = common_json::array();
            diff_error = e.what();
        }
        common_json out   = common_json::object();
        out["message"]    = msg_json(msg);
        out["diffs"]      = diffs;
        out["diff_error"] = diff_error;
        p->previous       = msg;
        return dup_string(out.dump());
    } catch (const std::exception & e) {
        set_error(err, e.what());
    } catch (...) {
        set_error(err, "unknown C++ exception while parsing the answer");
    }
    return nullptr;
}

}  // extern "C"
