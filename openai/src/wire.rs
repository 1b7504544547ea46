//! The chat-completions wire format, as much of it as ril sends and reads.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest excerpt of a reply quoted in an error: enough to recognise an HTML error page or a
/// truncated answer, short enough for one log line.
pub const MAX_DETAIL_CHARS: usize = 200;

/// A `POST /chat/completions` body. Floats are `f32`, the precision ril's sampling settings
/// travel at, so a value is sent as it was written (`0.7`, not `0.699999988079071`). Options
/// left `None` are not sent (api.openai.com refuses `top_k` and `repetition_penalty`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    /// Choices asked for.
    pub n: u32,
    pub temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    pub max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
}

/// One chat turn; `content` is a string or a list of content parts (`text`, `image_url`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Value,
}

impl ChatMessage {
    /// A turn of plain text.
    pub fn text(role: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: Value::String(text.into()),
        }
    }
}

/// A chat completion: its choices, in the order the server sent them.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletion {
    pub choices: Vec<Choice>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Choice {
    #[serde(default)]
    pub index: Option<u32>,
    pub message: ChoiceMessage,
    #[serde(default)]
    pub finish_reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChoiceMessage {
    #[serde(default)]
    pub content: Option<Value>,
}

impl ChatCompletion {
    /// Reads a reply body, or says (on one line, within [`MAX_DETAIL_CHARS`]) why it is not a
    /// chat completion, quoting its start.
    pub fn from_body(body: &str) -> Result<Self, String> {
        serde_json::from_str(body)
            .map_err(|e| snippet(&format!("reply is not a chat completion ({e}): {body}")))
    }
}

impl Choice {
    /// The choice's text: the string content, or the text parts of a list content joined (some
    /// servers answer with parts). `None` when there is no text content.
    pub fn text(&self) -> Option<String> {
        match &self.message.content {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(parts)) => Some(
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(""),
            ),
            _ => None,
        }
    }
}

/// The start of `text` on one line (whitespace runs collapsed), at most [`MAX_DETAIL_CHARS`]
/// characters.
pub fn snippet(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= MAX_DETAIL_CHARS {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(MAX_DETAIL_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// The MIME type of an encoded image, from its magic bytes.
pub fn image_mime(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("image/webp")
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("image/gif")
    } else {
        None
    }
}

/// An encoded image as a `data:` URL (`data:image/png;base64,...`), the type read from its
/// bytes; `None` when it is not PNG, JPEG, WebP or GIF.
pub fn image_data_url(bytes: &[u8]) -> Option<String> {
    let mime = image_mime(bytes)?;
    Some(format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_leave_out_unset_options_and_send_floats_as_written() {
        let request = ChatRequest {
            model: "m".into(),
            messages: vec![ChatMessage::text("user", "hi")],
            n: 2,
            temperature: 0.7,
            top_p: None,
            max_tokens: 8,
            seed: Some(3),
            top_k: None,
            repetition_penalty: Some(1.05),
        };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(
            text,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2,"temperature":0.7,"max_tokens":8,"seed":3,"repetition_penalty":1.05}"#
        );
    }

    #[test]
    fn replies_are_read_or_quoted_on_one_short_line() {
        let c = ChatCompletion::from_body(
            r#"{"choices": [{"index": 1, "message": {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}},
                            {"message": {"content": null}, "finish_reason": "length"}]}"#,
        )
        .unwrap();
        assert_eq!(c.choices[0].index, Some(1));
        assert_eq!(c.choices[0].text().as_deref(), Some("ab"));
        assert_eq!(c.choices[1].text(), None);
        assert_eq!(c.choices[1].finish_reason.as_deref(), Some("length"));
        let e = ChatCompletion::from_body(&format!("<html>\n{}", "x ".repeat(500))).unwrap_err();
        assert!(
            e.contains("not a chat completion") && e.contains("<html>"),
            "{e}"
        );
        assert!(
            !e.contains('\n') && e.chars().count() <= MAX_DETAIL_CHARS,
            "{e}"
        );
    }

    #[test]
    fn images_become_data_urls_by_their_bytes() {
        assert_eq!(image_mime(&[0xFF, 0xD8, 0xFF, 0xE0]), Some("image/jpeg"));
        assert_eq!(image_mime(b"RIFF\0\0\0\0WEBPVP8 "), Some("image/webp"));
        assert_eq!(image_mime(b"GIF89a.."), Some("image/gif"));
        assert_eq!(image_mime(b"hello"), None);
        let url = image_data_url(b"\x89PNG\r\n\x1a\nrest").unwrap();
        assert_eq!(url, "data:image/png;base64,iVBORw0KGgpyZXN0");
        assert_eq!(image_data_url(b"BM...."), None);
    }
}
