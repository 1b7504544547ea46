//! The synthetic benchmark: deterministic by seed, answers right (recomputed here from the scene
//! description by an independent implementation), images showing what the scene says.

use std::collections::BTreeMap;

use ril_data::dataset::{ReadOptions, read_all};
use ril_data::shapes::{SynthConfig, write_dataset};
use serde_json::Value;

fn small(seed: u64, n_train: usize) -> SynthConfig {
    SynthConfig {
        seed,
        n_train,
        n_val: 20,
        n_test: 300,
        ..Default::default()
    }
}

fn files(dir: &std::path::Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(dir).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn generation_is_deterministic_and_prefix_stable() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    write_dataset(&small(7, 30), a.path()).unwrap();
    write_dataset(&small(7, 30), b.path()).unwrap();
    assert_eq!(files(a.path()), files(b.path()), "same seed, same bytes");
    write_dataset(&small(7, 60), c.path()).unwrap();
    let first = |d: &std::path::Path| {
        std::fs::read_to_string(d.join("train.jsonl"))
            .unwrap()
            .lines()
            .take(30)
            .map(String::from)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        first(a.path()),
        first(c.path()),
        "more rows do not change the first ones"
    );
    let d = tempfile::tempdir().unwrap();
    write_dataset(&small(8, 30), d.path()).unwrap();
    assert_ne!(
        first(a.path()),
        first(d.path()),
        "another seed, another dataset"
    );
}

fn count(scene: &Value, colour: &Value, shape: &Value) -> usize {
    scene["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| {
            (colour.is_null() || o["colour"] == *colour)
                && (shape.is_null() || o["shape"] == *shape)
        })
        .count()
}

/// An independent answer from the stored scene and query.
fn recompute(scene: &Value, q: &Value) -> String {
    let objects = scene["objects"].as_array().unwrap();
    let yn = |b: bool| if b { "yes" } else { "no" }.to_string();
    let by = |c: &Value, s: &Value| {
        objects
            .iter()
            .find(|o| o["colour"] == *c && o["shape"] == *s)
            .unwrap()
            .clone()
    };
    match q["family"].as_str().unwrap() {
        "colour" => objects.iter().find(|o| o["shape"] == q["shape"]).unwrap()["colour"]
            .as_str()
            .unwrap()
            .into(),
        "shape" => objects.iter().find(|o| o["colour"] == q["colour"]).unwrap()["shape"]
            .as_str()
            .unwrap()
            .into(),
        "count" => count(scene, &q["filter"]["colour"], &q["filter"]["shape"]).to_string(),
        "exists" => yn(count(scene, &q["colour"], &q["shape"]) > 0),
        "compare" => yn(count(scene, &q["a"]["colour"], &q["a"]["shape"])
            > count(scene, &q["b"]["colour"], &q["b"]["shape"])),
        "arithmetic" => {
            let a = count(scene, &q["a"]["colour"], &q["a"]["shape"]) as i64;
            let b = count(scene, &q["b"]["colour"], &q["b"]["shape"]) as i64;
            if q["subtract"] == true {
                (a - b).to_string()
            } else {
                (a + b).to_string()
            }
        }
        "relation" => {
            let a = by(&q["a"][0], &q["a"][1]);
            let b = by(&q["b"][0], &q["b"][1]);
            let (ax, ay, bx, by_) = (
                a["x"].as_i64().unwrap(),
                a["y"].as_i64().unwrap(),
                b["x"].as_i64().unwrap(),
                b["y"].as_i64().unwrap(),
            );
            match q["relation"].as_str().unwrap() {
                "left" => yn(ax < bx),
                "right" => yn(ax > bx),
                "above" => yn(ay < by_),
                "below" => yn(ay > by_),
                other => panic!("relation {other}"),
            }
        }
        "describe" => {
            let mut objs: Vec<&Value> = objects.iter().collect();
            let cell = |o: &Value, i: usize| o["cell"][i].as_u64().unwrap();
            objs.sort_by_key(|o| (cell(o, 1), cell(o, 0)));
            objs.iter()
                .map(|o| {
                    let row = ["top", "middle", "bottom"][cell(o, 1) as usize];
                    let col = ["left", "centre", "right"][cell(o, 0) as usize];
                    format!(
                        "{row} {col}: {} {} {}",
                        o["size"].as_str().unwrap(),
                        o["colour"].as_str().unwrap(),
                        o["shape"].as_str().unwrap()
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        }
        other => panic!("family {other}"),
    }
}

#[test]
fn answers_follow_from_the_scene_and_images_show_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small(3, 200);
    write_dataset(&cfg, dir.path()).unwrap();
    let (rows, skipped) = read_all(&dir.path().join("test.jsonl"), ReadOptions::default()).unwrap();
    assert_eq!(rows.len(), 300);
    assert_eq!(skipped.skipped, 0);
    let mut families: BTreeMap<String, usize> = BTreeMap::new();
    let mut yes = 0;
    let mut yes_no = 0;
    for row in &rows {
        let scene = &row.extra["scene"];
        let query = &row.extra["query"];
        assert_eq!(recompute(scene, query), row.answer, "row {}", row.id);
        *families.entry(row.family.clone().unwrap()).or_default() += 1;
        if row.answer == "yes" || row.answer == "no" {
            yes_no += 1;
            yes += usize::from(row.answer == "yes");
        }
        // The pixel at each object's centre has the object's colour (up to the noise).
        let img = image::load_from_memory(&row.images[0].bytes)
            .unwrap()
            .to_rgb8();
        for o in scene["objects"].as_array().unwrap() {
            let px = img.get_pixel(
                o["x"].as_u64().unwrap() as u32,
                o["y"].as_u64().unwrap() as u32,
            );
            let colour: ril_data::shapes::Colour =
                serde_json::from_value(o["colour"].clone()).unwrap();
            let want = colour.rgb();
            let tol = (cfg.noise * 255.0).ceil() as i32 + 1;
            for c in 0..3 {
                assert!(
                    (px.0[c] as i32 - want[c] as i32).abs() <= tol,
                    "row {} object {o}",
                    row.id
                );
            }
        }
    }
    assert_eq!(families.len(), 7, "every family appears: {families:?}");
    assert!(families.values().all(|&n| n >= 15), "{families:?}");
    let share = yes as f64 / yes_no as f64;
    assert!(
        (0.3..=0.7).contains(&share),
        "yes share {share} over {yes_no} yes/no questions"
    );
}

#[test]
fn bad_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for cfg in [
        SynthConfig {
            max_objects: 12,
            ..Default::default()
        },
        SynthConfig {
            min_objects: 0,
            ..Default::default()
        },
        SynthConfig {
            image_size: 8,
            ..Default::default()
        },
        SynthConfig {
            noise: 2.0,
            ..Default::default()
        },
        SynthConfig {
            jitter: -0.5,
            ..Default::default()
        },
        SynthConfig {
            families: vec![],
            ..Default::default()
        },
        SynthConfig {
            families: vec!["colour".into(), "poetry".into()],
            ..Default::default()
        },
    ] {
        assert!(write_dataset(&cfg, dir.path()).is_err(), "{cfg:?}");
    }
}

#[test]
fn families_can_be_chosen_and_weighted_and_describe_lists_every_object() {
    let dir = tempfile::tempdir().unwrap();
    // "describe" three times and "count" once: about three describe rows per count row.
    let cfg = SynthConfig {
        families: ["describe", "describe", "describe", "count"]
            .map(String::from)
            .to_vec(),
        ..small(5, 400)
    };
    write_dataset(&cfg, dir.path()).unwrap();
    let (rows, _) = read_all(&dir.path().join("train.jsonl"), ReadOptions::default()).unwrap();
    let mut families: BTreeMap<String, usize> = BTreeMap::new();
    for row in &rows {
        *families.entry(row.family.clone().unwrap()).or_default() += 1;
        assert_eq!(
            recompute(&row.extra["scene"], &row.extra["query"]),
            row.answer,
            "row {}",
            row.id
        );
        if row.family.as_deref() == Some("describe") {
            assert_eq!(row.question_text(), "Describe the image.");
            let n = row.extra["scene"]["objects"].as_array().unwrap().len();
            assert_eq!(row.answer.split("; ").count(), n, "{}", row.answer);
        }
    }
    assert_eq!(families.len(), 2, "{families:?}");
    let share = families["describe"] as f64 / rows.len() as f64;
    assert!((0.65..=0.85).contains(&share), "describe share {share}");
}

#[test]
fn zero_jitter_centres_every_object_in_its_cell() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        jitter: 0.0,
        image_size: 72,
        ..small(6, 50)
    };
    write_dataset(&cfg, dir.path()).unwrap();
    let (rows, _) = read_all(&dir.path().join("train.jsonl"), ReadOptions::default()).unwrap();
    for row in &rows {
        for o in row.extra["scene"]["objects"].as_array().unwrap() {
            for (axis, coord) in [(0, "x"), (1, "y")] {
                let cell = o["cell"][axis].as_u64().unwrap();
                assert_eq!(o[coord].as_u64().unwrap(), cell * 24 + 12, "{o}");
            }
        }
    }
}

#[test]
fn the_background_colour_is_a_knob_and_defaults_to_clip_mean_grey() {
    for background in [ril_data::shapes::CLIP_MEAN_GREY, [250, 250, 250]] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SynthConfig {
            background,
            noise: 0.0,
            max_objects: 1,
            ..small(7, 5)
        };
        write_dataset(&cfg, dir.path()).unwrap();
        let (rows, _) = read_all(&dir.path().join("train.jsonl"), ReadOptions::default()).unwrap();
        for row in &rows {
            let img = image::load_from_memory(&row.images[0].bytes)
                .unwrap()
                .to_rgb8();
            // One object: at least one image corner is uncovered.
            let corners = [(0, 0), (63, 0), (0, 63), (63, 63)];
            assert!(
                corners
                    .iter()
                    .any(|&(x, y)| img.get_pixel(x, y).0 == background),
                "row {}: no corner shows the background {background:?}",
                row.id
            );
        }
    }
    assert_eq!(SynthConfig::default().background, [123, 117, 104]);
}

#[test]
fn every_question_row_carries_a_rationale_that_lists_the_scene_and_styles_write_it_out() {
    use ril_data::style::{AnswerStyle, styled_answer};
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        families: ["describe", "colour", "count", "relation"]
            .map(String::from)
            .to_vec(),
        ..small(8, 120)
    };
    write_dataset(&cfg, dir.path()).unwrap();
    let (rows, _) = read_all(&dir.path().join("train.jsonl"), ReadOptions::default()).unwrap();
    let mut with_rationale = 0;
    for row in &rows {
        let objects = row.extra["scene"]["objects"].as_array().unwrap();
        if row.family.as_deref() == Some("describe") {
            assert_eq!(row.rationale(), None, "row {}", row.id);
            continue;
        }
        with_rationale += 1;
        let rationale = row.rationale().unwrap_or_else(|| panic!("row {}", row.id));
        // One "cell: colour shape" item per object, each naming that object's colour and shape
        // in reading order (row, then column), and no sizes.
        let items: Vec<&str> = rationale.split("; ").collect();
        assert_eq!(items.len(), objects.len(), "{rationale}");
        let mut expected: Vec<&Value> = objects.iter().collect();
        expected.sort_by_key(|o| (o["cell"][1].as_u64(), o["cell"][0].as_u64()));
        for (item, o) in items.iter().zip(expected) {
            let what = format!(
                ": {} {}",
                o["colour"].as_str().unwrap(),
                o["shape"].as_str().unwrap()
            );
            assert!(item.ends_with(&what), "{item:?} vs {o}");
            assert!(!item.contains("small") && !item.contains("large"), "{item}");
        }
        let reasoned = styled_answer(row, AnswerStyle::Reasoned);
        assert_eq!(reasoned, format!("{rationale}\nAnswer: {}", row.answer));
        let narrated = styled_answer(row, AnswerStyle::Narrated);
        assert_eq!(
            narrated,
            format!("I see {rationale}. So the answer is {}.", row.answer)
        );
        // The rule-based judge reads the same answer out of every style.
        for styled in [reasoned, narrated] {
            assert!(
                ril_data::answer::check(&styled, &row.answer, row.answer_type).correct,
                "{styled:?} vs {:?}",
                row.answer
            );
        }
    }
    assert!(with_rationale > 50, "{with_rationale}");

    // Without rationales the rows are those of the same seed, minus the field.
    let bare = tempfile::tempdir().unwrap();
    write_dataset(
        &SynthConfig {
            rationale: false,
            ..cfg
        },
        bare.path(),
    )
    .unwrap();
    let (bare_rows, _) =
        read_all(&bare.path().join("train.jsonl"), ReadOptions::default()).unwrap();
    assert_eq!(bare_rows.len(), rows.len());
    for (b, r) in bare_rows.iter().zip(&rows) {
        assert_eq!(b.rationale(), None);
        let mut extra = r.extra.clone();
        extra.remove("rationale");
        assert_eq!((&b.id, &b.answer, &b.extra), (&r.id, &r.answer, &extra));
    }
}

/// A cell's name ("middle left") as (column, row).
fn cell_of(name: &str) -> (i64, i64) {
    let (row, col) = name.split_once(' ').unwrap();
    let r = ["top", "middle", "bottom"].iter().position(|x| *x == row);
    let c = ["left", "centre", "right"].iter().position(|x| *x == col);
    (c.unwrap() as i64, r.unwrap() as i64)
}

/// The yes/no answer of a relation question (`query` as the row's `query`) between the cells
/// of objects a and b.
fn relation_answer(query: &Value, a: (i64, i64), b: (i64, i64)) -> String {
    let holds = match query["relation"].as_str().unwrap() {
        "left" => a.0 < b.0,
        "right" => a.0 > b.0,
        "above" => a.1 < b.1,
        "below" => a.1 > b.1,
        other => panic!("{other}"),
    };
    if holds { "yes" } else { "no" }.to_string()
}

/// The focused rationale holds exactly what the answer follows from: the answer is recomputed
/// here from the rationale's text alone, for every family.
#[test]
fn the_focused_rationale_names_what_the_answer_follows_from() {
    use ril_data::shapes::RationaleKind;
    let dir = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        rationale_kind: RationaleKind::Focused,
        ..small(9, 400)
    };
    write_dataset(&cfg, dir.path()).unwrap();
    let (rows, _) = read_all(&dir.path().join("train.jsonl"), ReadOptions::default()).unwrap();
    let mut families = std::collections::BTreeSet::new();
    for row in &rows {
        let r = row
            .rationale()
            .unwrap_or_else(|| panic!("row {} has no rationale", row.id));
        let family = row.family.clone().unwrap();
        let derived = answer_from_focus(r, &family, &row.extra["query"]);
        assert_eq!(derived, row.answer, "row {}: {r:?} ({family})", row.id);
        families.insert(family);
    }
    assert_eq!(families.len(), 7, "{families:?}");
}

/// `stepwise` is the scene list, then the focused step, row for row (same seed, same rows).
#[test]
fn the_stepwise_rationale_is_the_scene_then_the_focused_step() {
    use ril_data::shapes::RationaleKind;
    let rows = |kind| rows_with_rationale(kind, 10, 60);
    let (scene, focused, stepwise) = (
        rows(RationaleKind::Scene),
        rows(RationaleKind::Focused),
        rows(RationaleKind::Stepwise),
    );
    assert_eq!(scene.len(), 60);
    for ((s, f), w) in scene.iter().zip(&focused).zip(&stepwise) {
        assert_eq!((&s.id, &s.answer), (&w.id, &w.answer));
        assert_eq!(
            w.rationale().unwrap(),
            format!("{}. {}", s.rationale().unwrap(), f.rationale().unwrap())
        );
    }
}

/// The tally rationale marks each object as it is read; the answer is recomputed here from the
/// marks and the closing counts alone, and the list is the scene (same seed, same rows).
#[test]
fn the_tally_rationale_marks_what_the_answer_follows_from() {
    use ril_data::shapes::RationaleKind;
    let rows = |kind| rows_with_rationale(kind, 12, 400);
    let (scene, tally) = (rows(RationaleKind::Scene), rows(RationaleKind::Tally));
    let mut families = std::collections::BTreeSet::new();
    for (s, t) in scene.iter().zip(&tally) {
        let r = t.rationale().unwrap();
        let (list, so) = match r.split_once(". so ") {
            Some((l, so)) => (l, Some(so)),
            None => (r, None),
        };
        // Without the marks, the list is the scene rationale.
        let unmarked: Vec<&str> = list
            .split("; ")
            .map(|item| item.split(" = ").next().unwrap())
            .collect();
        assert_eq!(unmarked.join("; "), s.rationale().unwrap(), "row {}", t.id);
        let marks: Vec<&str> = list
            .split("; ")
            .filter_map(|item| item.split_once(" = ").map(|(_, m)| m))
            .collect();
        let family = t.family.clone().unwrap();
        let q = &t.extra["query"];
        let number = |x: &str| x.parse::<i64>().unwrap_or_else(|_| panic!("{r:?}"));
        let derived = match family.as_str() {
            // The one marked object's mark is the answer.
            "colour" | "shape" => {
                assert_eq!(marks.len(), 1, "{r:?}");
                marks[0].to_string()
            }
            "count" | "exists" => {
                // The running count ends at the closing count.
                let n = number(so.unwrap());
                assert_eq!(marks.last().map_or(0, |m| number(m)), n, "{r:?}");
                if family == "count" {
                    n.to_string()
                } else if n > 0 {
                    "yes".into()
                } else {
                    "no".into()
                }
            }
            "compare" | "arithmetic" => {
                let so = so.unwrap();
                let (a, b) = so.split_once(", ").unwrap();
                let (a, b) = (number(&a[2..]), number(&b[2..]));
                let last = |p: &str| {
                    marks
                        .iter()
                        .flat_map(|m| m.split(' '))
                        .filter_map(|m| m.strip_prefix(p))
                        .map(number)
                        .max()
                        .unwrap_or(0)
                };
                assert_eq!((last("a"), last("b")), (a, b), "{r:?}");
                match (family.as_str(), q["subtract"] == true) {
                    ("compare", _) => if a > b { "yes" } else { "no" }.to_string(),
                    (_, true) => (a - b).to_string(),
                    _ => (a + b).to_string(),
                }
            }
            "relation" => {
                let so = so.unwrap();
                let (a, b) = so.split_once(", ").unwrap();
                let mut named = marks.clone();
                named.sort();
                assert_eq!(named, ["a", "b"], "{r:?}");
                relation_answer(q, cell_of(&a[2..]), cell_of(&b[2..]))
            }
            other => panic!("unexpected family {other}"),
        };
        assert_eq!(derived, t.answer, "row {}: {r:?} ({family})", t.id);
        families.insert(family);
    }
    assert_eq!(families.len(), 7, "{families:?}");
}

/// The answer a focused step ("the circle: top left, red", "red circles: top left (1)",
/// "the red circle: top left; the blue square: nowhere") determines, recomputed from its text.
fn answer_from_focus(r: &str, family: &str, q: &serde_json::Value) -> String {
    // "(n)" at the end of each "; "-separated listing.
    let counts = |r: &str| -> Vec<i64> {
        r.split("; ")
            .map(|part| {
                let n = part.rsplit_once('(').unwrap().1.trim_end_matches(')');
                n.parse().unwrap_or_else(|_| panic!("{r:?}"))
            })
            .collect()
    };
    match family {
        // The attribute asked for is the last word, after ", " or ": ".
        "colour" | "shape" => r.rsplit([',', ':']).next().unwrap().trim().to_string(),
        "count" => counts(r)[0].to_string(),
        "exists" => if counts(r)[0] > 0 { "yes" } else { "no" }.to_string(),
        "compare" => {
            let c = counts(r);
            if c[0] > c[1] { "yes" } else { "no" }.to_string()
        }
        "arithmetic" => {
            let c = counts(r);
            if q["subtract"] == true {
                (c[0] - c[1]).to_string()
            } else {
                (c[0] + c[1]).to_string()
            }
        }
        "relation" => {
            let cells: Vec<(i64, i64)> = r
                .split("; ")
                .map(|p| cell_of(p.rsplit_once(": ").unwrap().1))
                .collect();
            relation_answer(q, cells[0], cells[1])
        }
        other => panic!("unexpected family {other}"),
    }
}

/// `lookup`: the scene object first ("red circle at top left"), the same objects in the same
/// order as the scene rationale, then a focused step the answer is recomputed from.
#[test]
fn the_lookup_rationale_lists_objects_first_then_names_what_the_answer_follows_from() {
    use ril_data::shapes::RationaleKind;
    let rows = |kind| rows_with_rationale(kind, 14, 400);
    let (scene, lookup) = (rows(RationaleKind::Scene), rows(RationaleKind::Lookup));
    let mut families = std::collections::BTreeSet::new();
    for (s, l) in scene.iter().zip(&lookup) {
        assert_eq!((&s.id, &s.answer), (&l.id, &l.answer));
        let r = l.rationale().unwrap();
        let (list, focus) = r.split_once(". ").unwrap_or_else(|| panic!("{r:?}"));
        // "red circle at top left" is the scene's "top left: red circle" turned round.
        let turned: Vec<String> = s
            .rationale()
            .unwrap()
            .split("; ")
            .map(|item| match item.split_once(": ") {
                Some((cell, object)) => format!("{object} at {cell}"),
                None => item.to_string(),
            })
            .collect();
        assert_eq!(list, turned.join("; "), "row {}", l.id);
        let family = l.family.clone().unwrap();
        let q = &l.extra["query"];
        let focus = if family == "relation" {
            // "...; top is above middle (asked: below)": the cells compared along the
            // question's axis, the relation asked, and the answer is whether they agree.
            let (cells, verdict) = focus.rsplit_once("; ").unwrap();
            let (verdict, asked) = verdict.split_once(" (asked: ").unwrap();
            let asked_words = match q["relation"].as_str().unwrap() {
                "left" => "left of)",
                "right" => "right of)",
                other => &format!("{other})"),
            };
            assert_eq!(asked, asked_words, "row {}: {r:?}", l.id);
            let a: Vec<(i64, i64)> = cells
                .split("; ")
                .map(|p| cell_of(p.rsplit_once(": ").unwrap().1))
                .collect();
            let horizontal = matches!(q["relation"].as_str(), Some("left" | "right"));
            let (x, y) = if horizontal {
                (a[0].0, a[1].0)
            } else {
                (a[0].1, a[1].1)
            };
            let names = if horizontal {
                ["left", "centre", "right"]
            } else {
                ["top", "middle", "bottom"]
            };
            let word = match (horizontal, x.cmp(&y)) {
                (true, std::cmp::Ordering::Less) => "left of",
                (true, std::cmp::Ordering::Greater) => "right of",
                (false, std::cmp::Ordering::Less) => "above",
                (false, std::cmp::Ordering::Greater) => "below",
                (_, std::cmp::Ordering::Equal) => "level with",
            };
            let expected = format!("{} is {word} {}", names[x as usize], names[y as usize]);
            assert_eq!(verdict, expected, "row {}: {r:?}", l.id);
            let asked = q["relation"].as_str().unwrap();
            let holds = word.split(' ').next() == Some(asked);
            assert_eq!(
                if holds { "yes" } else { "no" },
                l.answer,
                "row {}: {r:?}",
                l.id
            );
            cells
        } else {
            focus
        };
        assert_eq!(
            answer_from_focus(focus, &family, q),
            l.answer,
            "row {}: {r:?} ({family})",
            l.id
        );
        families.insert(family);
    }
    assert_eq!(families.len(), 7, "{families:?}");
}

/// The training rows `small(seed, n_train)` writes with rationales of `kind`.
fn rows_with_rationale(
    kind: ril_data::shapes::RationaleKind,
    seed: u64,
    n_train: usize,
) -> Vec<ril_data::dataset::Row> {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(
        &SynthConfig {
            rationale_kind: kind,
            ..small(seed, n_train)
        },
        dir.path(),
    )
    .unwrap();
    read_all(&dir.path().join("train.jsonl"), ReadOptions::default())
        .unwrap()
        .0
}
