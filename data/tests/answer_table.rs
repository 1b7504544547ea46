//! The rule-based answer checker, table by table: each table is one concern, each row a named
//! case with the behaviour the reward depends on.

use ril_data::AnswerType::{self, Choice, Exact, Free, Number, YesNo};
use ril_data::answer::{
    NUMBER_ABSOLUTE_TOLERANCE, NUMBER_RELATIVE_TOLERANCE, check, extract_final_answer,
    infer_answer_type, normalize, parse_number,
};

/// (name, response, reference, answer type given by the dataset, expected correct)
type CheckRow = (
    &'static str,
    &'static str,
    &'static str,
    Option<AnswerType>,
    bool,
);

fn run_check_table(table: &[CheckRow]) -> usize {
    let mut failures = Vec::new();
    for &(name, response, reference, answer_type, expected) in table {
        let verdict = check(response, reference, answer_type);
        if verdict.correct != expected {
            failures.push(format!(
                "{name}: check({response:?}, {reference:?}, {answer_type:?}) = {} (expected \
                 {expected}); verdict {verdict:?}",
                verdict.correct
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    table.len()
}

#[test]
fn extraction() {
    let table: &[(&str, &str, &str)] = &[
        ("answer tag", "I count them.\n<answer>3</answer>", "3"),
        ("answer tag upper case", "<ANSWER> red </Answer>", "red"),
        (
            "last answer tag wins",
            "<answer>2</answer> wait <answer>3</answer>",
            "3",
        ),
        (
            "text after the tag ignored",
            "<answer>B</answer> but maybe C",
            "B",
        ),
        ("empty answer tag", "<answer></answer>", ""),
        ("unclosed tag", "Let me see. <answer>B", "B"),
        ("unclosed empty tag", "<answer>", ""),
        ("prefilled open tag", "red</answer>", "red"),
        (
            "phrase inside the tag",
            "<answer>The answer is B.</answer>",
            "B",
        ),
        ("boxed inside the tag", "<answer>$\\boxed{7}$</answer>", "7"),
        ("answer colon", "Thinking...\nAnswer: 42\nDone.", "42"),
        ("final answer", "Final answer: blue.", "blue"),
        ("the answer is", "So the answer is 12.", "12"),
        ("last phrase wins", "Answer: 3\nHmm, no.\nAnswer: 4", "4"),
        ("markdown bold", "**Answer:** B", "B"),
        (
            "markdown bold around the colon",
            "**Final Answer**: (C)",
            "(C)",
        ),
        ("answer on the next line", "Answer:\n\n  circle", "circle"),
        (
            "isn't is not a phrase",
            "The answer isn't obvious.\nred",
            "red",
        ),
        ("boxed", "We get \\boxed{5} in the end", "5"),
        (
            "last boxed nested braces",
            "\\boxed{1} then \\boxed{\\frac{1}{2}}",
            "\\frac{1}{2}",
        ),
        ("boxed unclosed", "\\boxed{12", "12"),
        ("phrase beats boxed", "\\boxed{5}\nThe answer is 6", "6"),
        (
            "last non-empty line",
            "Three shapes are visible.\n\nsquare\n\n",
            "square",
        ),
        ("single line trailing period", "There are 3.", "There are 3"),
        ("empty response", "", ""),
        ("only whitespace", "  \n\t ", ""),
    ];
    for &(name, response, expected) in table {
        assert_eq!(
            extract_final_answer(response),
            expected,
            "{name}: {response:?}"
        );
    }
}

#[test]
fn normalisation() {
    let table: &[(&str, &str, &str)] = &[
        ("case and whitespace", "  The  Red\tCircle ", "red circle"),
        ("trailing period", "circle.", "circle"),
        ("surrounding quotes", "\"red\"", "red"),
        ("exclamation", "Red!", "red"),
        (
            "articles as whole words",
            "a cat and an apple near the theatre",
            "cat and apple near theatre",
        ),
        ("number words", "three apples", "3 apples"),
        ("hyphenated compound", "twenty-one", "21"),
        ("spaced compound", "twenty one", "21"),
        ("hundred and", "one hundred and five", "105"),
        ("thousands", "two thousand five hundred", "2500"),
        ("separate number words stay separate", "one two", "1 2"),
        ("decimal kept", "3.5", "3.5"),
        ("negative kept", "-2", "-2"),
        ("thousands separator kept", "1,000", "1,000"),
        ("list comma removed", "red, blue", "red blue"),
        ("percent kept", "50%", "50%"),
        ("fraction kept", "3/4", "3/4"),
        ("apostrophe kept", "It's", "it's"),
        ("unicode lowercase", "CAFÉ Straße", "café straße"),
        ("full-width digits", "５", "5"),
        ("unicode minus", "\u{2212}3", "-3"),
        ("only punctuation", "?!...", ""),
        ("empty", "", ""),
    ];
    for &(name, text, expected) in table {
        assert_eq!(normalize(text), expected, "{name}: {text:?}");
    }
}

#[test]
fn number_parsing() {
    let table: &[(&str, &str, Option<f64>)] = &[
        ("integer", "3", Some(3.0)),
        ("decimal", "3.0", Some(3.0)),
        ("leading dot", ".5", Some(0.5)),
        ("negative", "-2.5", Some(-2.5)),
        ("unicode minus", "\u{2212}4", Some(-4.0)),
        ("thousands", "1,000", Some(1000.0)),
        ("millions", "1,234,567.5", Some(1_234_567.5)),
        ("not thousands", "1,2", Some(1.0)),
        ("fraction", "3/4", Some(0.75)),
        ("zero denominator skipped", "1/0 or 2", Some(2.0)),
        ("percentage is the number", "50%", Some(50.0)),
        ("exponent", "1e-6", Some(1e-6)),
        ("word", "three", Some(3.0)),
        ("compound word", "twenty-one", Some(21.0)),
        ("minus word", "minus three", Some(-3.0)),
        ("minus digits", "negative 2", Some(-2.0)),
        ("first number", "3 shapes and 2 circles", Some(3.0)),
        ("sentence", "There are 3.", Some(3.0)),
        ("after the last equals", "2 + 3 = 5", Some(5.0)),
        ("chained equals", "x = 2 * 3 = 6", Some(6.0)),
        ("equals without a number after", "5 = x", Some(5.0)),
        ("negated number skipped", "not 3, it's 4", Some(4.0)),
        ("isn't negates", "It isn't 3 but 7", Some(7.0)),
        ("only negated", "not 3", None),
        ("no as interjection", "No, 3", Some(3.0)),
        ("unit suffix", "5kg", Some(5.0)),
        ("full width", "１２", Some(12.0)),
        ("dollar", "$20", Some(20.0)),
        ("none", "red", None),
        ("empty", "", None),
        ("overflow", "1e999", None),
    ];
    for &(name, text, expected) in table {
        assert_eq!(parse_number(text), expected, "{name}: {text:?}");
    }
}

#[test]
fn tolerance_constants() {
    assert_eq!(NUMBER_RELATIVE_TOLERANCE, 1e-6);
    assert_eq!(NUMBER_ABSOLUTE_TOLERANCE, 1e-9);
}

#[test]
fn type_inference() {
    let table: &[(&str, AnswerType)] = &[
        ("3", Number),
        ("-2.5", Number),
        ("1,000", Number),
        ("50%", Number),
        ("twenty-one", Number),
        ("3/4", Number),
        ("Yes", YesNo),
        ("no.", YesNo),
        ("True", YesNo),
        ("B", Choice),
        ("(c)", Choice),
        ("D.", Choice),
        ("(B) red", Choice),
        ("B) red", Choice),
        ("A. Lincoln", Exact),
        ("red circle", Exact),
        ("2:30", Exact),
        ("3rd", Exact),
        ("3 apples", Exact),
        ("", Exact),
    ];
    for &(reference, expected) in table {
        assert_eq!(infer_answer_type(reference), expected, "{reference:?}");
    }
}

#[test]
fn number_answers() {
    let table: &[CheckRow] = &[
        ("digit", "<answer>3</answer>", "3", None, true),
        ("word", "Answer: three", "3", None, true),
        ("decimal", "3.0", "3", None, true),
        ("trailing noun", "Answer: 3 shapes", "3", None, true),
        ("sentence last line", "There are 3.", "3", None, true),
        ("word in a sentence", "I see three shapes.", "3", None, true),
        ("wrong number", "Answer: 4", "3", None, false),
        (
            "first number counts",
            "Answer: 3 red and 2 blue",
            "2",
            None,
            false,
        ),
        ("equation result", "Answer: 2 + 3 = 5", "5", None, true),
        (
            "equation operand is not the result",
            "Answer: 2 + 3 = 5",
            "3",
            None,
            false,
        ),
        ("correction", "The answer is not 3, it's 4", "4", None, true),
        (
            "correction not the negated",
            "The answer is not 3, it's 4",
            "3",
            None,
            false,
        ),
        ("compound word", "Answer: twenty-one", "21", None, true),
        ("spaced compound", "Answer: twenty one", "21", None, true),
        ("half as fraction", "0.5", "1/2", None, true),
        ("percent equals percent", "50%", "50%", None, true),
        ("percent equals number", "Answer: 50%", "50", None, true),
        ("percent is not a ratio", "50%", "0.5", None, false),
        ("thousands separator", "1,000", "1000", None, true),
        ("negative", "<answer>-7</answer>", "-7", None, true),
        ("sign matters", "<answer>7</answer>", "-7", None, false),
        ("within tolerance", "0.3333333", "1/3", Some(Number), true),
        ("outside tolerance", "0.333", "1/3", Some(Number), false),
        ("explicit number type", "3", "3 apples", Some(Number), true),
        ("no number", "many", "3", None, false),
        ("full width digit", "<answer>５</answer>", "5", None, true),
        (
            "reference not a number falls back",
            "red",
            "red",
            Some(Number),
            true,
        ),
    ];
    run_check_table(table);
}

#[test]
fn choice_answers() {
    let table: &[CheckRow] = &[
        ("bare letter", "B", "B", None, true),
        ("lowercase parenthesised", "(b)", "B", None, true),
        ("option keyword", "Option B", "B", None, true),
        ("letter with option text", "B) red", "B", None, true),
        ("the answer is", "The answer is B.", "B", None, true),
        (
            "answer is then reasoning",
            "The answer is B because it is red",
            "B",
            None,
            true,
        ),
        ("wrong letter", "C", "B", None, false),
        ("reference in parentheses", "B", "(B)", None, true),
        ("reference with text", "B", "B. red", Some(Choice), true),
        ("option text only", "red", "B. red", Some(Choice), true),
        ("wrong option text", "blue", "B. red", Some(Choice), false),
        ("letter beats text", "C) red", "B. red", Some(Choice), false),
        ("article trap", "a red circle", "A", None, false),
        (
            "capital article trap",
            "A red circle is shown.",
            "A",
            None,
            false,
        ),
        (
            "A after the phrase",
            "The answer is A because it is red",
            "A",
            None,
            true,
        ),
        (
            "single letter word first",
            "C because it is round",
            "C",
            None,
            true,
        ),
        (
            "article trap after the phrase",
            "The answer is a red circle",
            "A",
            None,
            false,
        ),
        ("lone lowercase a", "a", "A", None, true),
        (
            "parenthesised letter in prose",
            "I pick (C) since it is round",
            "C",
            None,
            true,
        ),
        (
            "tag wins over later letter",
            "<answer>B</answer> but maybe C",
            "B",
            None,
            true,
        ),
        (
            "last tag wins",
            "<answer>A</answer> no wait <answer>D</answer>",
            "D",
            None,
            true,
        ),
        (
            "letter in prose is not a choice",
            "I think B",
            "B",
            None,
            false,
        ),
        ("markdown", "**Answer:** **C**", "C", None, true),
        (
            "reference without letter falls back",
            "red",
            "red",
            Some(Choice),
            true,
        ),
    ];
    run_check_table(table);
}

#[test]
fn yes_no_answers() {
    let table: &[CheckRow] = &[
        ("yes period", "Yes.", "yes", None, true),
        ("yes exclamation", "yes!", "yes", None, true),
        ("upper case", "YES", "Yes", None, true),
        (
            "with justification",
            "Yes, there is a red square",
            "yes",
            None,
            true,
        ),
        ("no with justification", "No, there isn't", "no", None, true),
        ("no against yes", "No, there isn't", "yes", None, false),
        ("not sure", "Not sure", "no", None, false),
        ("true for yes", "<answer>true</answer>", "yes", None, true),
        ("incorrect for no", "Answer: incorrect", "No", None, true),
        (
            "the answer is yes",
            "Looking closely, the answer is yes.",
            "yes",
            None,
            true,
        ),
        ("tag", "<answer>No</answer>", "no", Some(YesNo), true),
        ("empty", "", "yes", None, false),
    ];
    run_check_table(table);
}

#[test]
fn exact_answers() {
    let table: &[CheckRow] = &[
        ("equal", "circle", "circle", None, true),
        ("trailing period", "circle.", "circle", None, true),
        ("case and punctuation", "Answer: RED!", "red", None, true),
        ("articles", "the red circle", "red circle", None, true),
        ("short sentence", "It is red", "red", None, true),
        (
            "answer phrase with period",
            "Answer: red.",
            "red",
            None,
            true,
        ),
        ("negated", "not red", "red", None, false),
        ("negated in a sentence", "It isn't red", "red", None, false),
        ("hedged with and", "red and blue", "red", None, false),
        ("hedged with or", "red or blue", "red", None, false),
        (
            "and inside the reference",
            "black and white",
            "black and white",
            None,
            true,
        ),
        (
            "too long",
            "I think the colour of that shape is red",
            "red",
            None,
            false,
        ),
        ("different", "blue", "red", None, false),
        ("word boundary", "reddish", "red", None, false),
        ("number words", "three circles", "3 circles", None, true),
        ("unicode", "Café", "café", None, true),
        (
            "free like exact",
            "<answer>A red square</answer>",
            "red square",
            Some(Free),
            true,
        ),
        (
            "free wrong",
            "<answer>blue square</answer>",
            "red square",
            Some(Free),
            false,
        ),
        ("empty reference", "red", "", Some(Exact), false),
        ("empty both", "", "", Some(Exact), true),
    ];
    run_check_table(table);
}

#[test]
fn verdict_reports_what_was_compared() {
    let verdict = check(
        "Let me look.\n<answer>The Red Circle.</answer>",
        "red circle",
        None,
    );
    assert!(verdict.correct);
    assert_eq!(verdict.extracted, "The Red Circle");
    assert_eq!(verdict.normalized_response, "red circle");
    assert_eq!(verdict.normalized_reference, "red circle");
}

/// Odd inputs never panic, whatever the type, and checking is deterministic.
#[test]
fn odd_inputs_never_panic() {
    let odd = [
        "",
        " ",
        "\n\n\n",
        ".",
        "?!",
        "()",
        "(",
        "[",
        "-",
        "--",
        "-.",
        ".-",
        "%",
        "/",
        "1/",
        "/2",
        "1,",
        ",000",
        "1e",
        "1e-",
        "e5",
        "=",
        "==",
        "= =",
        "and",
        "and one",
        "zero zero",
        "hundred thousand million billion",
        "billion billion",
        "<answer>",
        "</answer>",
        "<answer></answer>",
        "</answer><answer>",
        "<answer><answer>x</answer></answer>",
        "<answe",
        "\\boxed{",
        "\\boxed{}",
        "}{",
        "Answer:",
        "answer is",
        "Answer: \n",
        "option",
        "option (",
        "(a",
        "a)",
        "café",
        "５",
        "Ｂ",
        "（Ｂ）",
        "\u{2212}",
        "ǅ İ ß ﬁ",
        "e\u{301}",
        "🙂",
        "答案: 三",
        "\u{0}\u{7f}",
        "\r\n\r",
    ];
    let types = [
        None,
        Some(Exact),
        Some(Number),
        Some(Choice),
        Some(YesNo),
        Some(Free),
    ];
    let mut checked = 0;
    for response in odd {
        let _ = extract_final_answer(response);
        let _ = normalize(response);
        let _ = parse_number(response);
        let _ = infer_answer_type(response);
        for reference in odd {
            for answer_type in types {
                let first = check(response, reference, answer_type);
                let second = check(response, reference, answer_type);
                assert_eq!(first, second, "{response:?} vs {reference:?}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, odd.len() * odd.len() * types.len());
}

/// Huge inputs (a runaway generation) never panic; each is checked against a few references
/// only, since the work is linear in its length and the cross product would add nothing.
#[test]
fn huge_inputs_never_panic() {
    let huge = [
        "9".repeat(100_000),
        "<answer>".repeat(20_000) + &"</answer>".repeat(20_000),
        "twenty one hundred and ".repeat(10_000),
        "\\boxed{".repeat(10_000),
        "Answer:\n".repeat(20_000),
        "option (".repeat(20_000),
        "é".repeat(100_000),
    ];
    let types = [
        None,
        Some(Exact),
        Some(Number),
        Some(Choice),
        Some(YesNo),
        Some(Free),
    ];
    for text in &huge {
        let _ = extract_final_answer(text);
        let _ = normalize(text);
        let _ = parse_number(text);
        let _ = infer_answer_type(text);
        for reference in ["3", "B", "yes"] {
            for answer_type in types {
                let _ = check(text, reference, answer_type);
                let _ = check(reference, text, answer_type);
            }
        }
    }
}
