//! The OpenAI-compatible backend: `POST {base_url}/chat/completions` on vLLM, SGLang, llama.cpp or
//! OpenAI itself. The question's turns become chat messages; its images travel inline as data
//! URLs (`data:image/png;base64,...`, the type read from the bytes) in `image_url` content parts,
//! where the question places them (`{"type": "image"}` parts or `<image>` in the text), or before
//! the first user turn's text when it places none.
//!
//! One call asks for up to `max_n_per_call` choices (`n`); a server that returns fewer (some
//! ignore `n`) is asked again for the rest. Each call sends `seed + first answer index`, so
//! successive calls do not repeat one another.
//!
//! The HTTP side (retries with backoff, `Retry-After`, the concurrency limit, errors naming the
//! endpoint and the attempts) is `ril_openai`'s, shared with the discriminator's judge. A reply
//! that cannot be read fails at once: a server that garbles one answer would garble it again.

use std::fmt;
use std::ops::Range;

use ril_common::SamplingParams;
use ril_data::Row;
use ril_openai::{
    ChatCompletion, ChatMessage, ChatRequest, ClientConfig, OpenAiClient, check_api_key,
    image_data_url, snippet,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::debug;

use crate::error::TeacherError;
use crate::options::OpenAiOptions;

pub struct OpenAiBackend {
    options: OpenAiOptions,
    client: OpenAiClient,
}

impl fmt::Debug for OpenAiBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiBackend")
            .field("model", &self.options.model)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl OpenAiBackend {
    /// Reads the API key from its environment variable and builds the HTTP client. Nothing is
    /// sent: a server that is down is reported by the first request, naming the endpoint.
    pub fn load(options: &OpenAiOptions) -> Result<Self, TeacherError> {
        let api_key = match &options.api_key_env {
            None => None,
            Some(var) => {
                let key = std::env::var(var).map_err(|_| {
                    TeacherError::config(
                        "api_key_env",
                        format!("the environment variable {var} is not set (or not UTF-8)"),
                    )
                })?;
                // The key itself is never quoted.
                check_api_key(&key).map_err(|problem| {
                    TeacherError::config("api_key_env", format!("the key in {var} {problem}"))
                })?;
                Some(key)
            }
        };
        let client = OpenAiClient::new(ClientConfig {
            api_key,
            ..options.client_config()
        })?;
        Ok(Self {
            options: options.clone(),
            client,
        })
    }

    pub fn endpoint(&self) -> &str {
        self.client.endpoint()
    }

    pub fn describe(&self) -> String {
        format!("{} at {}", self.options.model, self.client.endpoint())
    }

    /// Generates answers `indices` of `row` and sends them, in order, to `out`.
    pub async fn generate(
        &self,
        row: &Row,
        settings: &SamplingParams,
        indices: Range<u32>,
        out: &mpsc::Sender<(u32, String)>,
    ) -> Result<(), TeacherError> {
        let messages = chat_messages(row)?;
        let mut next = indices.start;
        while next < indices.end {
            let want = (indices.end - next).min(self.options.max_n_per_call);
            let request = self.request(&messages, settings, want, next);
            let texts = self
                .client
                .post(&request, |body| read_answers(body, want))
                .await?;
            if (texts.len() as u32) < want {
                debug!(
                    asked = want,
                    got = texts.len(),
                    "the endpoint returned fewer choices than asked for; asking again for the rest"
                );
            }
            for text in texts.into_iter().take(want as usize) {
                if out.send((next, text)).await.is_err() {
                    return Ok(());
                }
                next += 1;
            }
        }
        Ok(())
    }

    /// Each call sends `seed + first answer index`, so successive calls do not repeat one
    /// another.
    fn request(
        &self,
        messages: &[ChatMessage],
        settings: &SamplingParams,
        n: u32,
        first_index: u32,
    ) -> ChatRequest {
        let extended = self.options.extended_sampling;
        ChatRequest {
            model: self.options.model.clone(),
            messages: messages.to_vec(),
            n,
            temperature: settings.temperature as f32,
            top_p: Some(settings.top_p as f32),
            max_tokens: u32::try_from(settings.max_new_tokens).unwrap_or(u32::MAX),
            seed: Some(settings.seed.wrapping_add(u64::from(first_index))),
            top_k: (extended && settings.top_k > 0)
                .then(|| u32::try_from(settings.top_k).unwrap_or(u32::MAX)),
            repetition_penalty: (extended && settings.repetition_penalty != 1.0)
                .then_some(settings.repetition_penalty as f32),
        }
    }
}

/// The texts of a completion's choices, in choice order; at least one.
fn read_answers(body: &str, asked: u32) -> Result<Vec<String>, String> {
    let mut choices = ChatCompletion::from_body(body)?.choices;
    if choices.is_empty() {
        return Err(format!("returned no choices (asked for n = {asked})"));
    }
    choices.sort_by_key(|c| c.index.unwrap_or(u32::MAX));
    choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.text()
                .map(|text| text.trim().to_string())
                .ok_or_else(|| snippet(&format!("choice {i} has no text content: {body}")))
        })
        .collect()
}

/// The question as OpenAI chat messages with its images inline.
pub(crate) fn chat_messages(row: &Row) -> Result<Vec<ChatMessage>, TeacherError> {
    let bad = |reason: String| TeacherError::BadQuestion {
        id: row.id.clone(),
        reason,
    };
    let urls: Vec<String> = row
        .images
        .iter()
        .map(|im| {
            image_data_url(&im.bytes).ok_or_else(|| {
                bad(format!(
                    "image {:?} is not PNG, JPEG, WebP or GIF (by its first bytes)",
                    im.name
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let placeholders = row.image_placeholders();
    // Where the images go when no message places them: the rule every role shares.
    let image_turn = ril_prompt::image_turn(row);
    let mut next = 0usize;
    let image_part = |next: &mut usize| -> Result<Value, TeacherError> {
        let url = urls.get(*next).ok_or_else(|| {
            bad(format!(
                "the conversation has {placeholders} image placeholders but {} images",
                urls.len()
            ))
        })?;
        *next += 1;
        Ok(json!({"type": "image_url", "image_url": {"url": url}}))
    };
    let mut messages = Vec::with_capacity(row.messages.len());
    for (i, m) in row.messages.iter().enumerate() {
        let content = match &m.content {
            Value::String(text) if text.contains("<image>") => {
                let mut parts = Vec::new();
                for (k, segment) in text.split("<image>").enumerate() {
                    if k > 0 {
                        parts.push(image_part(&mut next)?);
                    }
                    if !segment.trim().is_empty() {
                        parts.push(json!({"type": "text", "text": segment}));
                    }
                }
                Value::Array(parts)
            }
            Value::String(text) if Some(i) == image_turn => {
                let mut parts = Vec::new();
                for _ in 0..urls.len() {
                    parts.push(image_part(&mut next)?);
                }
                parts.push(json!({"type": "text", "text": text}));
                Value::Array(parts)
            }
            Value::Array(parts) => Value::Array(
                parts
                    .iter()
                    .map(|p| {
                        if p.get("type").and_then(Value::as_str) == Some("image") {
                            image_part(&mut next)
                        } else {
                            Ok(p.clone())
                        }
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => other.clone(),
        };
        messages.push(ChatMessage {
            role: m.role.clone(),
            content,
        });
    }
    if next != urls.len() {
        return Err(bad(format!(
            "the conversation has {placeholders} image placeholders but {} images",
            urls.len()
        )));
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use ril_data::dataset::{ImageData, Message};

    use super::*;

    fn row(content: Value, n_images: usize) -> Row {
        Row {
            id: "q1".into(),
            images: (0..n_images)
                .map(|i| ImageData {
                    name: format!("im{i}.png"),
                    bytes: b"\x89PNG\r\n\x1a\nrest".to_vec(),
                })
                .collect(),
            messages: vec![
                Message {
                    role: "system".into(),
                    content: Value::String("be brief".into()),
                },
                Message {
                    role: "user".into(),
                    content,
                },
            ],
            answer: "red".into(),
            answer_type: None,
            teacher_answers: Default::default(),
            family: None,
            extra: Default::default(),
        }
    }

    /// The messages as the request body carries them.
    fn messages(row: &Row) -> Result<Value, TeacherError> {
        Ok(serde_json::to_value(chat_messages(row)?).unwrap())
    }

    #[test]
    fn images_go_where_the_question_places_them() {
        let m = messages(&row(Value::String("What colour?".into()), 1)).unwrap();
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        let parts = m[1]["content"].as_array().unwrap();
        assert_eq!(parts.len(), 2);
        let url = parts[0]["image_url"]["url"].as_str().unwrap();
        assert!(url.starts_with("data:image/png;base64,"), "{url}");
        assert_eq!(parts[1], json!({"type": "text", "text": "What colour?"}));

        let m = messages(&row(Value::String("A <image> and B <image>?".into()), 2)).unwrap();
        let kinds: Vec<&str> = m[1]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["text", "image_url", "text", "image_url", "text"]);

        let m = messages(&row(
            json!([{"type": "text", "text": "see"}, {"type": "image"}]),
            1,
        ))
        .unwrap();
        assert_eq!(m[1]["content"][1]["type"], "image_url");

        let e = chat_messages(&row(json!([{"type": "image"}, {"type": "image"}]), 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("q1") && e.contains("2 image placeholders"),
            "{e}"
        );
        let mut r = row(Value::String("x".into()), 1);
        r.images[0].bytes = b"BM....".to_vec();
        let e = chat_messages(&r).unwrap_err().to_string();
        assert!(e.contains("im0.png") && e.contains("q1"), "{e}");
    }

    #[test]
    fn completions_are_read_in_choice_order() {
        let texts = read_answers(
            r#"{"choices": [{"index": 1, "message": {"content": " b "}},
                            {"index": 0, "message": {"content": "a"}}]}"#,
            2,
        )
        .unwrap();
        assert_eq!(texts, ["a", "b"]);
        assert!(read_answers("<html>", 1).unwrap_err().contains("<html>"));
        assert!(
            read_answers(r#"{"choices": [{"message": {"content": null}}]}"#, 1)
                .unwrap_err()
                .contains("choice 0")
        );
        assert!(
            read_answers(r#"{"choices": []}"#, 3)
                .unwrap_err()
                .contains("no choices (asked for n = 3)")
        );
    }
}
