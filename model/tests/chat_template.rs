//! The chat template and tokenizer agree with transformers 5.23 (fixtures from
//! tools/parity/make_fixtures.py).

mod common;

use ril_model::tokenizer::{ChatMessage, ChatTokenizer, render_template};
use serde_json::Value;

fn cases() -> Value {
    let text = std::fs::read_to_string(common::fixtures().join("chat_cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn rendered_prompts_and_ids_match_transformers() {
    let all = cases();
    let cases = all["cases"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let dir = common::fixtures().join(case["tokenizer_dir"].as_str().unwrap());
        let tok = ChatTokenizer::from_dir(&dir).unwrap();
        let msgs = messages(&case["messages"]);
        let add_gen = case["add_generation_prompt"].as_bool().unwrap();
        let text = tok.render(&msgs, add_gen).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "case {name}: rendered text"
        );
        let ids = tok.apply_chat_template(&msgs, add_gen).unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(ids, expected, "case {name}: ids");
        let plain: Vec<u32> =
            serde_json::from_value(case["encode_add_special_tokens_false_ids"].clone()).unwrap();
        assert_eq!(tok.encode(&text, false).unwrap(), plain, "case {name}");
        if let Some(with_special) = case.get("encode_add_special_tokens_true_ids") {
            let with_special: Vec<u32> = serde_json::from_value(with_special.clone()).unwrap();
            assert_eq!(
                tok.encode(&text, true).unwrap(),
                with_special,
                "case {name}: add_special_tokens"
            );
        }
    }
}

#[test]
fn bad_roles_raise_the_templates_own_error() {
    let all = cases();
    for case in all["error_cases"].as_array().unwrap() {
        let dir = common::fixtures().join(case["tokenizer_dir"].as_str().unwrap());
        let tok = ChatTokenizer::from_dir(&dir).unwrap();
        let err = tok
            .render(&messages(&case["messages"]), true)
            .unwrap_err()
            .to_string();
        let expected = case["message"].as_str().unwrap();
        assert!(
            err.contains(expected),
            "error {err:?} should contain {expected:?}"
        );
    }
}

#[test]
fn jinja_environment_behaves_like_transformers() {
    let all = cases();
    for case in all["jinja_env_cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let out = render_template(case["template"].as_str().unwrap(), &case["context"])
            .unwrap_or_else(|e| panic!("case {name}: {e}"));
        assert_eq!(out, case["output"].as_str().unwrap(), "case {name}");
    }
}

#[test]
fn plain_encoding_matches_transformers() {
    let all = cases();
    let tok = ChatTokenizer::from_dir(&common::fixtures().join("tokenizer_chatml")).unwrap();
    for case in all["plain_encode_cases_tokenizer_chatml"]
        .as_array()
        .unwrap()
    {
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(case["text"].as_str().unwrap(), false).unwrap(),
            expected
        );
    }
}

#[test]
fn special_tokens_come_from_the_config() {
    let all = cases();
    for (dir, ids) in all["special_ids"].as_object().unwrap() {
        let tok = ChatTokenizer::from_dir(&common::fixtures().join(dir)).unwrap();
        assert_eq!(
            tok.eos_id().map(u64::from),
            ids["eos_token_id"].as_u64(),
            "{dir}"
        );
        assert_eq!(
            tok.bos_id().map(u64::from),
            ids["bos_token_id"].as_u64(),
            "{dir}"
        );
    }
}

#[test]
fn a_broken_template_is_refused_at_load_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(
            common::fixtures().join("tokenizer_chatml").join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}{{ m.role }",
    )
    .unwrap();
    let err = ChatTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("chat_template.jinja") || err.contains("template"),
        "{err}"
    );
}
