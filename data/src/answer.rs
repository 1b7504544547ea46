//! Rule-based answer checking: the cheap judge behind RIL's answer reward.
//!
//! A response is free text written by a model under training, so the checker has to be robust
//! to everything a policy may learn to write (reasoning before the answer, markdown, LaTeX,
//! truncated tags, any Unicode) and must never panic: one bad rollout must not take down an
//! actor. It is also a reward, so it must not be gameable by hedging: "red and blue", "not 3"
//! or a stray article "a" must not earn the reward for "red", "3" or choice A.
//!
//! The pipeline is: [`extract_final_answer`] picks the final answer out of the response, then
//! [`check`] compares it with the reference according to the [`AnswerType`] (given by the
//! dataset row or inferred from the reference). Open-ended questions ([`AnswerType::Free`]) are
//! graded by the LLM judge; here they get the same strict treatment as [`AnswerType::Exact`].

use serde::{Deserialize, Serialize};

use crate::types::AnswerType;

/// Relative tolerance of numeric answers: "0.333333" is accepted for 1/3 and float noise such
/// as 0.1 + 0.2 never decides a reward, while 1.01 is still not 1.
pub const NUMBER_RELATIVE_TOLERANCE: f64 = 1e-6;

/// Absolute tolerance of numeric answers, so that answers near zero (where a relative tolerance
/// is meaningless) compare sanely.
pub const NUMBER_ABSOLUTE_TOLERANCE: f64 = 1e-9;

/// How many words an exact-type answer may have beyond the reference and still be accepted by
/// containment ("It is red" for "red"). Short, so that an essay that merely mentions the
/// reference somewhere is not rewarded.
pub const MAX_EXTRA_WORDS: usize = 4;

/// What the checker concluded, with the text it compared (for logs and eval reports).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub correct: bool,
    /// The final answer found in the response ([`extract_final_answer`]).
    pub extracted: String,
    /// `normalize(extracted)`.
    pub normalized_response: String,
    /// `normalize(reference)`.
    pub normalized_reference: String,
}

/// Rule-based check of `response` against `reference`.
///
/// With `answer_type: None` the type is inferred from the reference ([`infer_answer_type`]).
/// A typed check whose reference does not have that type's shape (a `Number` reference with no
/// number, a `Choice` reference with no letter, a `YesNo` reference that is neither) falls back
/// to the exact comparison instead of failing every response: the dataset row is more likely
/// to be mislabelled than the reference to be unanswerable.
pub fn check(response: &str, reference: &str, answer_type: Option<AnswerType>) -> Verdict {
    let Extracted {
        text: extracted,
        after_answer_phrase,
    } = extract(response);
    let answer_type = answer_type.unwrap_or_else(|| infer_answer_type(reference));
    let typed = match answer_type {
        AnswerType::Number => check_number(&extracted, reference),
        AnswerType::Choice => check_choice(&extracted, reference, after_answer_phrase),
        AnswerType::YesNo => check_yes_no(&extracted, reference),
        // Open-ended answers are the LLM judge's job; the rule-based fallback is the strict
        // exact comparison, so that it never rewards what it cannot understand.
        AnswerType::Exact | AnswerType::Free => None,
    };
    let correct = typed.unwrap_or_else(|| exact_match(&extracted, reference));
    Verdict {
        correct,
        normalized_response: normalize(&extracted),
        normalized_reference: normalize(reference),
        extracted,
    }
}

/// The answer type a reference implies when the dataset does not say: `yes`/`no`/`true`/`false`
/// -> `YesNo`; a reference that is a single number ("3", "-2.5", "1,000", "3/4", "50%",
/// "twenty-one") -> `Number`; a letter A-J standing alone ("B", "(B)", "B.") or with option
/// text in the bracket forms ("(B) red", "B) red") -> `Choice`; anything else -> `Exact`.
///
/// "B. red" is deliberately not inferred as a choice: it reads the same as an initial ("A.
/// Lincoln"). Rows with such references say `answer_type: choice` explicitly.
pub fn infer_answer_type(reference: &str) -> AnswerType {
    let words = normalized_words(reference);
    if let [word] = words.as_slice() {
        if matches!(word.as_str(), "yes" | "no" | "true" | "false") {
            return AnswerType::YesNo;
        }
        if is_whole_number_token(word) {
            return AnswerType::Number;
        }
    }
    match leading_choice(strip_markup(reference)) {
        Some(choice) if choice.option_text.is_none() || choice.bracketed => AnswerType::Choice,
        _ => AnswerType::Exact,
    }
}

// ---------------------------------------------------------------------------------------------
// Extraction
// ---------------------------------------------------------------------------------------------

const OPEN_TAG: &str = "<answer>";
const CLOSE_TAG: &str = "</answer>";

/// The final answer inside a free-text response.
///
/// Priority, from the most to the least explicit signal of what the model meant as its answer:
/// 1. The last `<answer>...</answer>` block (tags case-insensitive). The last, because a model
///    that revises itself writes its final answer last. Inside the block an answer phrase or a
///    `\boxed{}` is unwrapped ("<answer>The answer is B</answer>" -> "B"); otherwise the whole
///    trimmed content is the answer, empty for `<answer></answer>`. Text after the block ("but
///    maybe C") is ignored: the tag is the contract with the prompt. An opening tag that is never
///    closed (a truncated generation) uses the text after it; a closing tag with no opening tag
///    before it (the prompt prefilled `<answer>`) uses the text before it; both then go through
///    the untagged rules below.
/// 2. The last `Answer: X`, `Final answer: X` or `The answer is X` (case-insensitive, markdown
///    bold allowed), X running to the end of its line, or the next non-empty line when the phrase
///    ends its line.
/// 3. The last `\boxed{X}`, nested braces allowed.
/// 4. The last non-empty line: short answers are usually written last.
///
/// The result is trimmed, loses wrapping markup (`**`, backticks, `$`) and trailing periods.
/// Never panics: every index used to slice is the position of an ASCII byte found by search.
pub fn extract_final_answer(response: &str) -> String {
    extract(response).text
}

/// An extracted answer and how it was found.
struct Extracted {
    text: String,
    /// Found after "answer:" / "the answer is": the text is then known to start with the
    /// answer, which lets "The answer is A because..." choose A (see [`response_choice`]).
    after_answer_phrase: bool,
}

impl Extracted {
    fn new(answer: &str, after_answer_phrase: bool) -> Self {
        Self {
            text: tidy(answer),
            after_answer_phrase,
        }
    }
}

fn extract(response: &str) -> Extracted {
    tagged_answer(response).unwrap_or_else(|| untagged_answer(response))
}

/// Rule 1 of [`extract_final_answer`]; `None` when the response has no answer tag at all.
fn tagged_answer(response: &str) -> Option<Extracted> {
    // ASCII lowercasing keeps every byte offset, so positions found in `lower` slice `response`.
    let lower = response.to_ascii_lowercase();
    let mut tags: Vec<(usize, bool)> = lower
        .match_indices(OPEN_TAG)
        .map(|(position, _)| (position, true))
        .chain(
            lower
                .match_indices(CLOSE_TAG)
                .map(|(position, _)| (position, false)),
        )
        .collect();
    if tags.is_empty() {
        return None;
    }
    tags.sort_unstable();

    enum Block {
        Closed(usize, usize),
        Prefilled(usize),
    }
    let mut open_content_start: Option<usize> = None;
    let mut last_block: Option<Block> = None;
    for (index, &(position, is_open)) in tags.iter().enumerate() {
        if is_open {
            // A second opening tag before a close restarts the block: the innermost wins.
            open_content_start = Some(position + OPEN_TAG.len());
        } else if let Some(start) = open_content_start.take() {
            last_block = Some(Block::Closed(start, position));
        } else if index == 0 {
            last_block = Some(Block::Prefilled(position));
        }
        // Any other stray closing tag is noise and ignored.
    }
    let answer = match (last_block, open_content_start) {
        (Some(Block::Closed(start, end)), _) => answer_in_block(&response[start..end]),
        (Some(Block::Prefilled(end)), _) => untagged_answer(&response[..end]),
        (None, Some(start)) => untagged_answer(&response[start..]),
        (None, None) => return None,
    };
    Some(answer)
}

/// The content of a closed answer block, unwrapping an answer phrase or `\boxed{}` written
/// inside it.
fn answer_in_block(content: &str) -> Extracted {
    match answer_phrase(content) {
        Some(answer) => Extracted::new(answer, true),
        None => Extracted::new(boxed(content).unwrap_or(content), false),
    }
}

/// Rules 2-4 of [`extract_final_answer`].
fn untagged_answer(text: &str) -> Extracted {
    match answer_phrase(text) {
        Some(answer) => Extracted::new(answer, true),
        None => Extracted::new(
            boxed(text).unwrap_or_else(|| last_non_empty_line(text)),
            false,
        ),
    }
}

/// The text after the last `answer:` / `answer is` phrase whose answer is not empty.
fn answer_phrase(text: &str) -> Option<&str> {
    let lower = text.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let is_markup_or_space = |b: u8| matches!(b, b'*' | b'_' | b' ' | b'\t');
    let skip = |mut i: usize, pred: &dyn Fn(u8) -> bool| {
        while i < bytes.len() && pred(bytes[i]) {
            i += 1;
        }
        i
    };
    for (position, keyword) in lower.rmatch_indices("answer") {
        let starts_word = text[..position]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric());
        if !starts_word {
            continue;
        }
        let mut i = skip(position + keyword.len(), &is_markup_or_space);
        if bytes.get(i) == Some(&b':') {
            i += 1;
        } else if lower[i..].starts_with("is")
            && !bytes.get(i + 2).is_some_and(u8::is_ascii_alphanumeric)
        {
            i = skip(i + 2, &is_markup_or_space);
            if bytes.get(i) == Some(&b':') {
                i += 1;
            }
        } else {
            continue;
        }
        let start = skip(i, &|b| is_markup_or_space(b) || b == b':');
        let rest = &text[start..];
        let line = rest.lines().next().unwrap_or("");
        let answer = if line.trim().is_empty() {
            // "Answer:\nB": the answer is on the next line.
            rest.lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("")
        } else {
            line
        };
        if !tidy(answer).is_empty() {
            return Some(answer);
        }
    }
    None
}

/// The content of the last `\boxed{...}`, braces balanced; the rest of the text when the box
/// is never closed.
fn boxed(text: &str) -> Option<&str> {
    const BOXED: &str = "\\boxed{";
    let start = text.rfind(BOXED)? + BOXED.len();
    let content = &text[start..];
    let mut depth = 1usize;
    for (offset, c) in content.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&content[..offset]);
                }
            }
            _ => {}
        }
    }
    Some(content)
}

fn last_non_empty_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("")
}

/// Trims an extracted answer: a `\boxed{}` inside it is unwrapped (LaTeX answers such as
/// "The answer is $\boxed{5}$."), then wrapping markup and trailing periods go, because they
/// are how the answer was written, not what it says.
fn tidy(answer: &str) -> String {
    let answer = boxed(answer).unwrap_or(answer);
    let mut answer = answer.trim();
    loop {
        let before = answer.len();
        answer = answer
            .trim_matches(|c: char| matches!(c, '*' | '`' | '$') || c.is_whitespace())
            .trim_end_matches('.');
        if answer.len() == before {
            return answer.to_string();
        }
    }
}

/// Wrapping a bare answer may carry: whitespace, markdown, quotes and trailing periods.
fn strip_markup(text: &str) -> &str {
    text.trim_matches(|c: char| {
        matches!(c, '*' | '`' | '$' | '"' | '\'' | '\u{201c}' | '\u{201d}') || c.is_whitespace()
    })
    .trim_end_matches('.')
}

// ---------------------------------------------------------------------------------------------
// Normalisation
// ---------------------------------------------------------------------------------------------

/// Normalises text for comparison: Unicode lowercase; full-width forms ("５", "Ｂ") and the
/// Unicode minus mapped to ASCII; punctuation and quotes become spaces, except where they are
/// part of a word or a number ("it's", "x-ray", "3.5", "-2", "1,000", "3/4", "50%"); the
/// articles a/an/the dropped as whole words; number words turned into digits ("twenty-one",
/// "one hundred and five" -> "21", "105"); whitespace collapsed to single spaces.
///
/// Each rule removes a way of writing the same answer that a grader would not care about:
/// "The Red circle." and "red circle" say the same thing. A trailing period goes with the
/// punctuation rule, since a period is only kept between digits.
pub fn normalize(text: &str) -> String {
    normalized_words(text).join(" ")
}

/// The words of `normalize(text)`.
fn normalized_words(text: &str) -> Vec<String> {
    let words: Vec<String> = words(text)
        .into_iter()
        .filter(|word| !matches!(word.as_str(), "a" | "an" | "the"))
        .collect();
    let mut normalized = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        if let Some((value, used)) = number_word_run(&words[i..]) {
            normalized.push(value.to_string());
            i += used;
        } else {
            normalized.push(words[i].clone());
            i += 1;
        }
    }
    normalized
}

/// Maps characters that have an ASCII twin to it, so that "５" is 5 and "−3" is -3.
fn canonical_char(c: char) -> char {
    match c {
        // Full-width ASCII forms (U+FF01..U+FF5E) sit at a fixed offset from ASCII.
        '\u{ff01}'..='\u{ff5e}' => char::from_u32(c as u32 - 0xfee0).unwrap_or(c),
        '\u{3000}' => ' ',
        '\u{2212}' | '\u{2010}' | '\u{2011}' => '-',
        '\u{2018}' | '\u{2019}' | '\u{02bc}' => '\'',
        _ => c,
    }
}

/// Lowercased words with punctuation turned into separators (see [`normalize`]), articles and
/// number words untouched.
fn words(text: &str) -> Vec<String> {
    let chars: Vec<char> = text
        .chars()
        .map(canonical_char)
        .flat_map(char::to_lowercase)
        .collect();
    let is_digit = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
    let is_word_char = |c: char| c.is_alphanumeric() || ('\u{300}'..='\u{36f}').contains(&c);
    let is_word = |c: Option<char>| c.is_some_and(is_word_char);
    let mut cleaned = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        let previous = i.checked_sub(1).map(|j| chars[j]);
        let next = chars.get(i + 1).copied();
        let keep = is_word_char(c)
            || match c {
                '.' => is_digit(next) && (is_digit(previous) || !is_word(previous)),
                ',' | ':' | '/' => is_digit(previous) && is_digit(next),
                '\'' => is_word(previous) && is_word(next),
                '-' => is_word(next) && (is_word(previous) || is_digit(next)),
                '%' => is_digit(previous),
                _ => false,
            };
        cleaned.push(if keep { c } else { ' ' });
    }
    cleaned.split_whitespace().map(str::to_string).collect()
}

// ---------------------------------------------------------------------------------------------
// Numbers
// ---------------------------------------------------------------------------------------------

/// Parses the number a text answers with, or `None` when it has none.
///
/// Numbers are written with an optional sign, thousands separators ("1,000"), a decimal part,
/// an exponent ("1e-6"), as fractions ("3/4") or percentages, or as number words ("three",
/// "twenty-one", "twenty one", "one hundred and five", "minus three").
///
/// Which number counts, when the text has several:
/// - With an `=`, the first number after the last `=`: a model that shows its working ends with
///   the result ("2 + 3 = 5" -> 5).
/// - Otherwise the first number ("3 shapes", "There are 3.") that is not directly negated: a
///   number right after "not", "never" or an "n't" word is skipped, so that a correction
///   counts for what it says ("not 3, it's 4" -> 4), and a bare "not 3" has no number at all.
///
/// A percentage is the number before `%` ("50%" -> 50, not 0.5): datasets write the reference
/// as "50%" or "50" far more often than as "0.5". A fraction with a zero denominator, a
/// non-finite value and decimal commas ("0,5" -> 0) are not supported.
pub fn parse_number(text: &str) -> Option<f64> {
    let text: String = text.chars().map(canonical_char).collect();
    if let Some(equals) = text.rfind('=')
        && let Some(value) = first_number(&text[equals + 1..])
    {
        return Some(value);
    }
    first_number(&text)
}

/// Whether two parsed numbers are the same answer, within the tolerances.
fn numbers_equal(a: f64, b: f64) -> bool {
    let tolerance = NUMBER_ABSOLUTE_TOLERANCE.max(NUMBER_RELATIVE_TOLERANCE * a.abs().max(b.abs()));
    (a - b).abs() <= tolerance
}

/// A word that negates what follows it ("not red", "isn't 3").
fn is_negation(word: &str) -> bool {
    matches!(word, "not" | "no" | "never") || word.ends_with("n't")
}

/// [`is_negation`] without "no": before a number, "no" is mostly the interjection of a
/// correction ("No, 3") rather than a negation of the number.
fn negates_number(word: &str) -> bool {
    word != "no" && is_negation(word)
}

/// The first number in `text` not directly negated (see [`parse_number`]).
fn first_number(text: &str) -> Option<f64> {
    let words = words(text);
    let mut i = 0;
    while i < words.len() {
        let negated = i > 0 && negates_number(&words[i - 1]);
        if let Some((value, _)) = numeric_prefix(&words[i]) {
            if !negated {
                return Some(value);
            }
            i += 1;
            continue;
        }
        let sign_word = matches!(words[i].as_str(), "minus" | "negative");
        let run_start = if sign_word { i + 1 } else { i };
        if sign_word && let Some((value, _)) = words.get(run_start).and_then(|w| numeric_prefix(w))
        {
            if !negated {
                return Some(-value);
            }
            i = run_start + 1;
            continue;
        }
        if let Some((value, used)) = words.get(run_start..).and_then(number_word_run) {
            if !negated {
                let value = value as f64;
                return Some(if sign_word { -value } else { value });
            }
            i = run_start + used;
            continue;
        }
        i += 1;
    }
    None
}

/// Whether a normalised word is exactly one number (a trailing `%` allowed), as a reference
/// must be for the `Number` type to be inferred: "2:30" or "3rd" are not numbers to compare
/// with a tolerance.
fn is_whole_number_token(word: &str) -> bool {
    match numeric_prefix(word) {
        Some((_, used)) => word[used..].is_empty() || &word[used..] == "%",
        None => false,
    }
}

/// The number a word starts with, and how many bytes it takes: sign, digits with thousands
/// separators, decimals, exponent, then an optional `/denominator`.
fn numeric_prefix(word: &str) -> Option<(f64, usize)> {
    let bytes = word.as_bytes();
    let is_digit_at = |i: usize| bytes.get(i).is_some_and(u8::is_ascii_digit);
    let digits_from = |mut i: usize, out: &mut String| {
        while is_digit_at(i) {
            out.push(char::from(bytes[i]));
            i += 1;
        }
        i
    };
    let mut i = 0;
    let negative = bytes.first() == Some(&b'-');
    if negative {
        i = 1;
    }
    let mut number = String::new();
    let integer_start = i;
    i = digits_from(i, &mut number);
    // Thousands separators only after a first group of 1-3 digits and in groups of exactly 3.
    if (1..=3).contains(&(i - integer_start)) {
        while bytes.get(i) == Some(&b',')
            && (1..=3).all(|k| is_digit_at(i + k))
            && !is_digit_at(i + 4)
        {
            i = digits_from(i + 1, &mut number);
        }
    }
    if bytes.get(i) == Some(&b'.') && is_digit_at(i + 1) {
        number.push_str(if number.is_empty() { "0." } else { "." });
        i = digits_from(i + 1, &mut number);
    }
    if number.is_empty() {
        return None;
    }
    if bytes.get(i) == Some(&b'e') {
        let mut exponent = String::from("e");
        let mut j = i + 1;
        if bytes.get(j) == Some(&b'-') {
            exponent.push('-');
            j += 1;
        }
        if is_digit_at(j) {
            i = digits_from(j, &mut exponent);
            number.push_str(&exponent);
        }
    }
    let mut value: f64 = number.parse().ok()?;
    if bytes.get(i) == Some(&b'/') && is_digit_at(i + 1) {
        let mut denominator = String::new();
        i = digits_from(i + 1, &mut denominator);
        if bytes.get(i) == Some(&b'.') && is_digit_at(i + 1) {
            denominator.push('.');
            i = digits_from(i + 1, &mut denominator);
        }
        let denominator: f64 = denominator.parse().ok()?;
        if denominator == 0.0 {
            return None;
        }
        value /= denominator;
    }
    if negative {
        value = -value;
    }
    value.is_finite().then_some((value, i))
}

fn small_number_word(word: &str) -> Option<u64> {
    Some(match word {
        "zero" => 0,
        "one" => 1,
        "two" => 2,
        "three" => 3,
        "four" => 4,
        "five" => 5,
        "six" => 6,
        "seven" => 7,
        "eight" => 8,
        "nine" => 9,
        "ten" => 10,
        "eleven" => 11,
        "twelve" => 12,
        "thirteen" => 13,
        "fourteen" => 14,
        "fifteen" => 15,
        "sixteen" => 16,
        "seventeen" => 17,
        "eighteen" => 18,
        "nineteen" => 19,
        "twenty" => 20,
        "thirty" => 30,
        "forty" => 40,
        "fifty" => 50,
        "sixty" => 60,
        "seventy" => 70,
        "eighty" => 80,
        "ninety" => 90,
        _ => return None,
    })
}

fn scale_word(word: &str) -> Option<u64> {
    match word {
        "thousand" => Some(1_000),
        "million" => Some(1_000_000),
        "billion" => Some(1_000_000_000),
        _ => None,
    }
}

/// A number being read from words. Only grammatical sequences are accepted, so that "one two
/// three" stays three numbers instead of summing to 6, and "zero" stands alone.
#[derive(Clone)]
struct NumberWords {
    /// Value of the completed thousand/million/billion groups.
    total: u64,
    /// Value below the last scale word (0..=9999, "nineteen hundred" included).
    group: u64,
    /// The last scale used; the next must be smaller ("two thousand one million" is two numbers).
    last_scale: u64,
    parts: usize,
    zero: bool,
    after_and: bool,
}

impl NumberWords {
    fn new() -> Self {
        Self {
            total: 0,
            group: 0,
            last_scale: u64::MAX,
            parts: 0,
            zero: false,
            after_and: false,
        }
    }

    fn value(&self) -> u64 {
        self.total + self.group
    }

    /// Adds one word (a hyphenated compound is added part by part); `false` when the word does
    /// not continue the number.
    fn accept(&mut self, part: &str) -> bool {
        if self.zero {
            return false;
        }
        if part == "and" {
            // "one hundred and five": only between a hundred/scale and what follows it.
            let accepted = !self.after_and
                && self.group.is_multiple_of(100)
                && (self.group > 0 || self.total > 0);
            self.after_and |= accepted;
            return accepted;
        }
        if let Some(value) = small_number_word(part) {
            if value == 0 {
                self.zero = self.parts == 0;
                self.parts += usize::from(self.zero);
                return self.zero;
            }
            let below_hundred = self.group % 100;
            let fits = below_hundred == 0
                || (value < 10 && below_hundred >= 20 && below_hundred.is_multiple_of(10));
            if fits {
                self.group += value;
                self.parts += 1;
                self.after_and = false;
            }
            return fits;
        }
        if self.after_and {
            return false;
        }
        if part == "hundred" {
            if self.group == 0 && self.parts == 0 {
                self.group = 100;
            } else if (1..100).contains(&self.group) {
                self.group *= 100;
            } else {
                return false;
            }
            self.parts += 1;
            return true;
        }
        if let Some(scale) = scale_word(part) {
            if scale >= self.last_scale {
                return false;
            }
            let multiplier = match (self.group, self.parts) {
                (0, 0) => 1,
                (0, _) => return false,
                (group, _) => group,
            };
            self.total += multiplier * scale;
            self.group = 0;
            self.last_scale = scale;
            self.parts += 1;
            return true;
        }
        false
    }
}

/// The longest grammatical run of number words at the start of `words`: its value and how many
/// words it takes. A trailing "and" is not part of the number.
fn number_word_run(words: &[String]) -> Option<(u64, usize)> {
    let mut number = NumberWords::new();
    let mut longest = None;
    for (i, word) in words.iter().enumerate() {
        if !word.split('-').all(|part| number.accept(part)) {
            break;
        }
        if !number.after_and {
            longest = Some((number.value(), i + 1));
        }
    }
    longest
}

fn check_number(extracted: &str, reference: &str) -> Option<bool> {
    let expected = parse_number(reference)?;
    Some(parse_number(extracted).is_some_and(|got| numbers_equal(got, expected)))
}

// ---------------------------------------------------------------------------------------------
// Multiple choice
// ---------------------------------------------------------------------------------------------

/// A choice letter written at the start of a text, with the option text after it.
struct LeadingChoice<'a> {
    letter: char,
    option_text: Option<&'a str>,
    /// "(B)" / "[B]" / "B)": a form that cannot be read as an initial or an article.
    bracketed: bool,
}

fn choice_letter(byte: Option<&u8>) -> Option<char> {
    let letter = char::from(*byte?).to_ascii_uppercase();
    ('A'..='J').contains(&letter).then_some(letter)
}

/// A letter A-J (either case) alone or at the start of the text in one of the forms options are
/// written in: "B", "(B)", "[B]", "B.", "B)", "B:", each optionally followed by whitespace and
/// the option text. A letter followed by a plain space ("a red circle") is not a choice: that
/// is the article trap.
fn leading_choice(text: &str) -> Option<LeadingChoice<'_>> {
    let bytes = text.as_bytes();
    let (letter, rest, bracketed) = match bytes.first()? {
        open @ (b'(' | b'[') => {
            let close = if *open == b'(' { b')' } else { b']' };
            if bytes.get(2) != Some(&close) {
                return None;
            }
            (choice_letter(bytes.get(1))?, &text[3..], true)
        }
        _ => {
            let letter = choice_letter(bytes.first())?;
            match bytes.get(1) {
                None => (letter, "", false),
                Some(b')') => (letter, &text[2..], true),
                Some(b'.' | b':') => (letter, &text[2..], false),
                Some(_) => return None,
            }
        }
    };
    if !rest.is_empty() && !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let option_text = Some(strip_markup(rest.trim())).filter(|text| !text.is_empty());
    Some(LeadingChoice {
        letter,
        option_text,
        bracketed,
    })
}

/// The letter a response chooses, or `None` when it names none.
///
/// Accepted, in order:
/// - the leading forms of [`leading_choice`] ("B", "(b)", "B) red");
/// - a first word that is a single letter other than A and I, the only one-letter English
///   words ("B because it is red"). A or I as first word count only in upper case right after an
///   answer phrase ("The answer is A because..."), never in lower case ("the answer is a red
///   circle", "a red circle": the article trap) nor as the start of a sentence ("A red circle
///   is shown", "I think B");
/// - a letter after "option" or "choice" ("Option B", "choice (c)"), or after "answer" /
///   "answer is" inside the answer under the article rule above;
/// - a bracketed "(B)" anywhere.
///
/// A letter floating in prose ("I think B") is not accepted: too many sentences contain one.
fn response_choice(extracted: &str, after_answer_phrase: bool) -> Option<char> {
    let text = strip_markup(extracted);
    if let Some(choice) = leading_choice(text) {
        return Some(choice.letter);
    }
    let bytes = text.as_bytes();
    if let Some(letter) = choice_letter(bytes.first())
        && bytes.get(1).is_some_and(u8::is_ascii_whitespace)
    {
        let is_word = matches!(letter, 'A' | 'I');
        if !is_word || (after_answer_phrase && bytes[0].is_ascii_uppercase()) {
            return Some(letter);
        }
    }
    let lower = text.to_ascii_lowercase();
    let mut earliest: Option<(usize, char)> = None;
    for keyword in ["option", "choice", "answer"] {
        for (position, _) in lower.match_indices(keyword) {
            let starts_word = text[..position]
                .chars()
                .next_back()
                .is_none_or(|c| !c.is_alphanumeric());
            if !starts_word || earliest.is_some_and(|(first, _)| first < position) {
                continue;
            }
            let after_keyword = position + keyword.len();
            let mut i = after_keyword;
            let skip_separators = |mut i: usize| {
                while matches!(bytes.get(i), Some(b' ' | b'\t' | b':' | b'*')) {
                    i += 1;
                }
                i
            };
            i = skip_separators(i);
            if keyword == "answer" && lower[i..].starts_with("is ") {
                i = skip_separators(i + 2);
            }
            if i == after_keyword {
                continue;
            }
            let bracketed = matches!(bytes.get(i), Some(b'(' | b'['));
            let letter_at = i + usize::from(bracketed);
            let Some(letter) = choice_letter(bytes.get(letter_at)) else {
                continue;
            };
            let mut end = letter_at + 1;
            if bracketed {
                if !matches!(bytes.get(end), Some(b')' | b']')) {
                    continue;
                }
                end += 1;
            }
            let following = bytes.get(end).copied();
            if following.is_some_and(|b| b.is_ascii_alphanumeric() || b >= 0x80) {
                continue;
            }
            let could_be_article = keyword == "answer"
                && !bracketed
                && bytes[letter_at].is_ascii_lowercase()
                && following.is_some_and(|b| b.is_ascii_whitespace());
            if could_be_article {
                continue;
            }
            earliest = Some((position, letter));
            break;
        }
    }
    if let Some((_, letter)) = earliest {
        return Some(letter);
    }
    text.match_indices('(').find_map(|(position, _)| {
        let letter = choice_letter(bytes.get(position + 1))?;
        (bytes.get(position + 2) == Some(&b')')).then_some(letter)
    })
}

/// The response's letter against the reference's; without a letter, the option text (when
/// the reference gives one, "B. red") compared like an exact answer.
fn check_choice(extracted: &str, reference: &str, after_answer_phrase: bool) -> Option<bool> {
    let expected = leading_choice(strip_markup(reference))?;
    let correct = match response_choice(extracted, after_answer_phrase) {
        Some(letter) => letter == expected.letter,
        None => expected
            .option_text
            .is_some_and(|option_text| exact_match(extracted, option_text)),
    };
    Some(correct)
}

// ---------------------------------------------------------------------------------------------
// Yes / no
// ---------------------------------------------------------------------------------------------

/// The polarity of a text's first word: models answer "Yes, there is a red square", and the
/// first word is the answer while the rest is justification. "Not sure" is neither.
fn yes_no(text: &str) -> Option<bool> {
    let first = words(text).into_iter().next()?;
    match first.as_str() {
        "yes" | "true" | "correct" | "y" => Some(true),
        "no" | "false" | "incorrect" | "n" => Some(false),
        _ => None,
    }
}

fn check_yes_no(extracted: &str, reference: &str) -> Option<bool> {
    let expected = yes_no(reference)?;
    Some(yes_no(extracted) == Some(expected))
}

// ---------------------------------------------------------------------------------------------
// Exact
// ---------------------------------------------------------------------------------------------

/// Normalised equality, or the reference as a whole-word sequence inside a short answer ("It is
/// red" for "red"; at most [`MAX_EXTRA_WORDS`] more words than the reference).
///
/// Containment is what makes short sentences acceptable, and also what a policy could exploit,
/// so it is refused when the answer negates the reference (a "not", "no", "never" or "n't" word
/// before it: "not red") or hedges between alternatives (an "and" / "or" outside the matched
/// words: "red and blue"). A reference that normalises to nothing matches only an answer that
/// does too.
fn exact_match(extracted: &str, reference: &str) -> bool {
    let expected = normalized_words(reference);
    let answer = normalized_words(extracted);
    if answer == expected {
        return true;
    }
    if expected.is_empty() || answer.len() > expected.len() + MAX_EXTRA_WORDS {
        return false;
    }
    let Some(start) = answer
        .windows(expected.len())
        .position(|window| window == expected.as_slice())
    else {
        return false;
    };
    let before = &answer[..start];
    let after = &answer[start + expected.len()..];
    let negated = before.iter().any(|word| is_negation(word));
    let hedged = before
        .iter()
        .chain(after)
        .any(|word| word == "and" || word == "or");
    !negated && !hedged
}
