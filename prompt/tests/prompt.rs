//! The one row -> prompt rule, pinned on its edge cases through a real test-size model (the
//! built-in byte-level tokenizer and chat template, real PNG decoding).

use candle_core::{DType, Device};
use ril_data::Row;
use ril_data::dataset::{ImageData, Message};
use ril_model::bundle::Bundle;
use ril_model::image::{ImageProcessor, ImageProcessorConfig};
use ril_model::{Head, LlavaConfig, Vlm};
use serde_json::{Value, json};

fn bundle() -> Bundle {
    let tokenizer = ril_model::tokenizer::byte_level_chatml().unwrap();
    let image_id = tokenizer.token_id("<image>").unwrap();
    let cfg = LlavaConfig::for_tests(tokenizer.vocab_size(), image_id);
    let model = Vlm::new_random(&cfg, Head::LanguageModel, &Device::Cpu, DType::F32, 0).unwrap();
    let processor = ImageProcessor::new(ImageProcessorConfig::clip(16)).unwrap();
    Bundle {
        model,
        tokenizer,
        processor,
    }
}

fn png(i: usize) -> ImageData {
    ImageData {
        name: format!("img{i}.png"),
        bytes: ril_model::toy::square_png(16, 16, [255, 255, 255], Some([30, 40, 200])).unwrap(),
    }
}

fn message(role: &str, content: Value) -> Message {
    Message {
        role: role.into(),
        content,
    }
}

fn row(images: usize, messages: Vec<Message>) -> Row {
    Row {
        id: "r1".into(),
        images: (0..images).map(png).collect(),
        messages,
        answer: "blue".into(),
        answer_type: None,
        teacher_answers: Default::default(),
        family: None,
        extra: Default::default(),
    }
}

fn image_parts(content: &Value) -> usize {
    content
        .as_array()
        .map(|parts| parts.iter().filter(|p| p["type"] == "image").count())
        .unwrap_or(0)
}

/// Image token positions in a prompt (each image expands to the model's features per image).
fn image_tokens(bundle: &Bundle, ids: &[u32]) -> usize {
    let image_id = bundle.model.config().image_token_index;
    ids.iter().filter(|&&i| i == image_id).count()
}

#[test]
fn a_plain_question_gets_every_image_before_its_text_on_the_first_user_turn() {
    let b = bundle();
    let r = row(
        2,
        vec![
            message("system", json!("Answer briefly.")),
            message("user", json!("Which is bigger?")),
            message("assistant", json!("The left one.")),
            message("user", json!("And the colour?")),
        ],
    );
    assert_eq!(ril_prompt::image_turn(&r), Some(1));
    let messages = ril_prompt::row_messages(&r);
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[0].content, json!("Answer briefly."));
    assert_eq!(
        messages[1].content,
        json!([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Which is bigger?"}])
    );
    assert_eq!(image_parts(&messages[3].content), 0);
    let p = ril_prompt::prompt(&b, &r).unwrap();
    let per_image = b.model.config().image_features_per_image();
    assert_eq!(image_tokens(&b, &p.token_ids), 2 * per_image);
    assert_eq!(p.pixel_values.unwrap().dims()[0], 2);
}

#[test]
fn a_conversation_that_places_its_images_is_left_as_it_is() {
    let b = bundle();
    // `<image>` in the text: the template sees the text unchanged.
    let r = row(1, vec![message("user", json!("<image>\nWhat colour?"))]);
    assert_eq!(ril_prompt::image_turn(&r), None);
    assert_eq!(
        ril_prompt::row_messages(&r)[0].content,
        json!("<image>\nWhat colour?")
    );
    ril_prompt::prompt(&b, &r).unwrap();
    // Image parts already there: unchanged, and they take the row's images in order.
    let parts = json!([{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]);
    let r = row(2, vec![message("user", parts.clone())]);
    assert_eq!(ril_prompt::row_messages(&r)[0].content, parts);
    let p = ril_prompt::prompt(&b, &r).unwrap();
    assert_eq!(p.pixel_values.unwrap().dims()[0], 2);
}

#[test]
fn a_row_without_a_user_turn_puts_its_images_on_no_message_and_is_refused_by_name() {
    let b = bundle();
    let r = row(1, vec![message("system", json!("Describe the image."))]);
    assert_eq!(ril_prompt::image_turn(&r), None);
    let messages = ril_prompt::row_messages(&r);
    assert_eq!(messages[0].content, json!("Describe the image."));
    let e = ril_prompt::prompt(&b, &r).unwrap_err().to_string();
    assert!(e.starts_with("row r1: "), "{e}");
    assert!(
        e.contains("0 image placeholders") && e.contains("1 images"),
        "{e}"
    );
}

#[test]
fn more_placeholders_than_images_is_refused_naming_the_row() {
    let b = bundle();
    let r = row(1, vec![message("user", json!("<image> and <image>?"))]);
    let e = ril_prompt::prompt(&b, &r).unwrap_err().to_string();
    assert!(
        e.contains("row r1") && e.contains("2 image placeholders"),
        "{e}"
    );
}

#[test]
fn a_text_only_row_has_no_image_parts() {
    let b = bundle();
    let r = row(0, vec![message("user", json!("What is 2 + 2?"))]);
    assert_eq!(ril_prompt::image_turn(&r), None);
    assert_eq!(
        ril_prompt::row_messages(&r)[0].content,
        json!("What is 2 + 2?")
    );
    let p = ril_prompt::prompt(&b, &r).unwrap();
    assert!(p.pixel_values.is_none());
    assert_eq!(image_tokens(&b, &p.token_ids), 0);
}

#[test]
fn answers_and_supervised_targets_end_with_the_end_of_turn_token() {
    let b = bundle();
    let eos = b.tokenizer.eos_id().unwrap();
    let ids = ril_prompt::answer_ids(&b.tokenizer, "blue").unwrap();
    assert_eq!(ids.last(), Some(&eos));
    assert_eq!(
        &ids[..ids.len() - 1],
        b.tokenizer.encode("blue", false).unwrap()
    );
    let r = row(1, vec![message("user", json!("What colour?"))]);
    let ex = ril_prompt::supervised(&b, &r, "blue").unwrap();
    assert_eq!(ex.target_ids, ids);
    assert_eq!(ex.prompt_ids, ril_prompt::prompt(&b, &r).unwrap().token_ids);
}

#[test]
fn a_prompt_that_leaves_no_room_to_answer_is_refused_with_the_numbers() {
    let b = bundle();
    let r = row(1, vec![message("user", json!("What colour?"))]);
    let context = b.model.max_positions();
    let p = ril_prompt::prompt_within_context(&b, &r, 1).unwrap();
    let e = ril_prompt::prompt_within_context(&b, &r, context)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("row r1")
            && e.contains(&format!("{} tokens", p.token_ids.len()))
            && e.contains(&format!("context of {context}")),
        "{e}"
    );
}
