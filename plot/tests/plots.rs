//! Every plot is written as a real PNG in a temporary folder, decoded back, and checked for its
//! size and for having something drawn on it (text, lines, bars: several distinct colours).

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use ril_plot::{
    BAR_PLOT_HEIGHT, LINE_PLOT_SIZE, LinePlot, PlotError, Series, bar_plot, bar_plot_width,
    line_plot, metrics_plots,
};

/// The first of the palette's colours (series 0, the bars) and the second (series 1, the
/// reference bars).
const BLUE: [u8; 3] = [31, 119, 180];
const ORANGE: [u8; 3] = [255, 127, 14];

struct Decoded {
    width: u32,
    height: u32,
    pixels: Vec<[u8; 3]>,
}

impl Decoded {
    fn colours(&self) -> HashSet<[u8; 3]> {
        self.pixels.iter().copied().collect()
    }
    fn count(&self, colour: [u8; 3]) -> usize {
        self.pixels.iter().filter(|&&p| p == colour).count()
    }
    /// Pixels darker than light grey: text, axes, data — not the background or the faint grid.
    fn dark(&self) -> usize {
        self.pixels
            .iter()
            .filter(|p| p.iter().map(|&c| c as u32).sum::<u32>() < 3 * 160)
            .count()
    }
}

fn decode(path: &Path) -> Decoded {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().expect("a PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("a buffer size")];
    let info = reader.next_frame(&mut buf).expect("PNG image data");
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    assert_eq!(info.bit_depth, png::BitDepth::Eight, "{}", path.display());
    let pixels = buf[..info.buffer_size()]
        .chunks_exact(3)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    Decoded {
        width: info.width,
        height: info.height,
        pixels,
    }
}

/// A decoded plot of `size` whose background is white and that has text and lines on it.
fn assert_drawn(path: &Path, size: (u32, u32)) -> Decoded {
    let img = decode(path);
    assert_eq!((img.width, img.height), size, "{}", path.display());
    assert_eq!(img.pixels.len(), (size.0 * size.1) as usize);
    let white = img.count([255, 255, 255]);
    assert!(
        white > img.pixels.len() / 3,
        "{}: a white background",
        path.display()
    );
    assert!(white < img.pixels.len(), "{}: not blank", path.display());
    // Anti-aliased text and lines give many shades; a flat or nearly flat image does not.
    let colours = img.colours().len();
    assert!(colours >= 20, "{}: only {colours} colours", path.display());
    // Title, tick labels and axes make at least a few thousand dark pixels.
    assert!(
        img.dark() > 1500,
        "{}: {} dark pixels",
        path.display(),
        img.dark()
    );
    img
}

fn series(label: &str, points: Vec<(f64, f64)>) -> Series {
    Series {
        label: label.into(),
        points,
    }
}

#[test]
fn a_line_plot_draws_each_series_in_its_colour() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/folder/line.png");
    let plot = LinePlot {
        title: "Loss".into(),
        x_label: "step".into(),
        y_label: "loss".into(),
        series: vec![
            series(
                "train",
                (0..100)
                    .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
                    .collect(),
            ),
            series(
                "eval",
                (0..10)
                    .map(|i| (10.0 * i as f64, 0.8 - 0.05 * i as f64))
                    .collect(),
            ),
        ],
        y_range: None,
    };
    line_plot(&plot, &path).unwrap();
    let img = assert_drawn(&path, LINE_PLOT_SIZE);
    assert!(
        img.count(BLUE) > 300,
        "the first series' line: {}",
        img.count(BLUE)
    );
    assert!(
        img.count(ORANGE) > 300,
        "the second series' line: {}",
        img.count(ORANGE)
    );
}

#[test]
fn non_finite_points_are_skipped_and_constant_data_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nan.png");
    let plot = LinePlot {
        title: "With holes".into(),
        x_label: "x".into(),
        y_label: "y".into(),
        series: vec![
            series(
                "some NaN",
                vec![
                    (0.0, 1.0),
                    (1.0, f64::NAN),
                    (2.0, 3.0),
                    (f64::INFINITY, 2.0),
                    (4.0, f64::NEG_INFINITY),
                    (5.0, 2.0),
                ],
            ),
            series("all NaN", vec![(0.0, f64::NAN), (f64::NAN, 1.0)]),
        ],
        y_range: None,
    };
    line_plot(&plot, &path).unwrap();
    let img = assert_drawn(&path, LINE_PLOT_SIZE);
    assert!(img.count(BLUE) > 100);

    // Constant data, and a single point: zero-width ranges are widened.
    for (name, points) in [
        ("constant.png", vec![(0.0, 0.5), (1.0, 0.5), (2.0, 0.5)]),
        ("zero.png", vec![(3.0, 0.0), (3.0, 0.0)]),
        ("single.png", vec![(7.0, -2.5)]),
        ("huge.png", vec![(0.0, -1e300), (1.0, 1e300)]),
    ] {
        let path = dir.path().join(name);
        let plot = LinePlot {
            title: name.into(),
            series: vec![series("s", points)],
            ..LinePlot::default()
        };
        line_plot(&plot, &path).unwrap();
        assert_drawn(&path, LINE_PLOT_SIZE);
    }
}

#[test]
fn a_fixed_y_range_is_kept_and_points_outside_it_do_not_break_the_plot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("range.png");
    let plot = LinePlot {
        title: "Accuracy".into(),
        x_label: "step".into(),
        y_label: "accuracy".into(),
        series: vec![series(
            "acc",
            vec![(0.0, 0.2), (1.0, 0.7), (2.0, 1.4), (3.0, -0.3)],
        )],
        y_range: Some((0.0, 1.0)),
    };
    line_plot(&plot, &path).unwrap();
    let img = assert_drawn(&path, LINE_PLOT_SIZE);
    assert!(img.count(BLUE) > 100);
}

#[test]
fn an_empty_plot_still_writes_a_png_saying_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let empty = LinePlot {
        title: "Nothing yet".into(),
        x_label: "step".into(),
        y_label: "value".into(),
        series: vec![],
        y_range: None,
    };
    let no_series = dir.path().join("no_series.png");
    line_plot(&empty, &no_series).unwrap();
    let a = assert_drawn(&no_series, LINE_PLOT_SIZE);

    let empty_series = dir.path().join("empty_series.png");
    let plot = LinePlot {
        series: vec![series("a", vec![]), series("b", vec![])],
        ..empty.clone()
    };
    line_plot(&plot, &empty_series).unwrap();
    let b = assert_drawn(&empty_series, LINE_PLOT_SIZE);
    // The "no data" text is in grey (120, 120, 120) anti-aliased: the exact grey is there.
    assert!(a.count([120, 120, 120]) > 50);
    // "a (no data)" and "b (no data)" in the legend, drawn in the series' colours.
    assert!(b.count(BLUE) > 10 && b.count(ORANGE) > 10);
}

#[test]
fn an_unwritable_path_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "not a folder").unwrap();
    let path = blocker.join("plot.png");
    let err = line_plot(&LinePlot::default(), &path).unwrap_err();
    assert!(matches!(err, PlotError::Write { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&*blocker.to_string_lossy()),
        "{err}"
    );
}

fn write_lines(path: &Path, lines: &[&str]) {
    let mut f = std::fs::File::create(path).unwrap();
    for line in lines {
        writeln!(f, "{line}").unwrap();
    }
}

#[test]
fn metrics_plots_are_written_from_lines_with_missing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    let mut lines = Vec::new();
    for step in 1..=30 {
        let t = step as f64 / 30.0;
        let mut line = serde_json::json!({
            "iteration": step - 1,
            "version": step,
            "time": 1.7e9 + step as f64,
            "reward_ans_student_mean": 0.3 + 0.3 * t,
            "reward_sim_student_mean": 0.2 + 0.1 * t,
            "reward_student_mean": 0.5 + 0.4 * t,
            "kl_mean": 0.01 * t,
            "entropy_mean": 1.5 - 0.3 * t,
        });
        // Teachers answer only on some steps; D's accuracy is null (NaN) on some.
        if step % 3 == 0 {
            line["reward_ans_teacher_mean"] = 0.8.into();
            line["reward_sim_teacher_mean"] = 0.7.into();
            line["reward_teacher_mean"] = 1.5.into();
        }
        line["d_accuracy"] = if step % 4 == 0 {
            serde_json::Value::Null
        } else {
            (0.9 - 0.3 * t).into()
        };
        lines.push(line.to_string());
    }
    lines.insert(5, String::new()); // a blank line
    lines.insert(9, r#"{"iteration": 99, "kl_mean": 0.5}"#.to_string()); // no version
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    write_lines(&metrics, &refs);

    let out = dir.path().join("plots");
    let accuracy = [(0.0, 0.4), (10.0, 0.45), (20.0, f64::NAN), (30.0, 0.5)];
    let written = metrics_plots(&metrics, &out, &accuracy).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["rewards.png", "discriminator.png", "kl.png", "accuracy.png"]
    );
    for path in &written {
        assert_eq!(path.parent().unwrap(), out);
        assert_drawn(path, LINE_PLOT_SIZE);
    }
    // Each of the six reward series has a colour of its own; the first is blue.
    let rewards = decode(&written[0]);
    assert!(rewards.count(BLUE) > 200);
    assert!(rewards.count(ORANGE) > 50);
    // D's accuracy in blue with a grey chance line.
    let d = decode(&written[1]);
    assert!(d.count(BLUE) > 200);
    assert!(d.count([120, 120, 120]) > 100);
}

#[test]
fn a_malformed_line_is_an_error_naming_the_file_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    write_lines(
        &metrics,
        &[
            r#"{"version": 1, "kl_mean": 0.1}"#,
            r#"{"version": 2, "kl_mean": 0.2}"#,
            r#"{"version": 3, "kl_mean": 0.3"#,
            r#"{"version": 4, "kl_mean": 0.4}"#,
        ],
    );
    let err = metrics_plots(&metrics, &dir.path().join("out"), &[]).unwrap_err();
    match &err {
        PlotError::Parse { path, line, .. } => {
            assert_eq!(path, &metrics);
            assert_eq!(*line, 3);
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains("metrics.jsonl"), "{message}");
    assert!(message.contains("line 3"), "{message}");

    // JSON that is not an object is refused too.
    write_lines(&metrics, &[r#"{"version": 1}"#, "[1, 2]"]);
    let err = metrics_plots(&metrics, &dir.path().join("out"), &[]).unwrap_err();
    assert!(
        err.to_string().contains("line 2: not a JSON object"),
        "{err}"
    );

    // A missing file names the file.
    let missing = dir.path().join("missing.jsonl");
    let err = metrics_plots(&missing, &dir.path().join("out"), &[]).unwrap_err();
    assert!(matches!(err, PlotError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("missing.jsonl"), "{err}");
}

#[test]
fn a_torn_last_line_without_its_newline_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::write(
        &metrics,
        "{\"version\": 1, \"kl_mean\": 0.1}\n{\"version\": 2, \"kl_mean\": 0.2}\n{\"version\": 3, \"kl_",
    )
    .unwrap();
    let written = metrics_plots(&metrics, &dir.path().join("out"), &[]).unwrap();
    assert_eq!(written.len(), 4);
}

#[test]
fn an_empty_metrics_file_gives_no_data_plots() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("metrics.jsonl");
    std::fs::write(&metrics, "").unwrap();
    let out = dir.path().join("out");
    let written = metrics_plots(&metrics, &out, &[]).unwrap();
    assert_eq!(written.len(), 4);
    for path in &written {
        let img = assert_drawn(path, LINE_PLOT_SIZE);
        // "no data" in grey.
        assert!(img.count([120, 120, 120]) > 50, "{}", path.display());
    }
}

fn variants() -> Vec<(String, f64, f64)> {
    [
        ("RIL, both teachers", 0.642, 0.011),
        ("RIL, teacher A only", 0.631, 0.014),
        ("RIL, teacher B only", 0.625, 0.009),
        ("GRPO (answer reward only)", 0.608, 0.012),
        ("RIL without answer reward", 0.571, 0.02),
        ("RIL, frozen discriminator", 0.615, f64::NAN),
        ("SFT on teacher answers", 0.590, 0.007),
        ("base model", 0.520, 0.0),
        (
            "a_very_long_variant_name_without_any_spaces_at_all_to_wrap",
            f64::NAN,
            0.1,
        ),
    ]
    .into_iter()
    .map(|(l, m, s)| (l.to_string(), m, s))
    .collect()
}

#[test]
fn a_bar_plot_draws_bars_with_error_bars_and_reference_values() {
    let dir = tempfile::tempdir().unwrap();
    let bars = variants();
    let reference = vec![
        ("RIL, both teachers".to_string(), 0.651),
        ("GRPO (answer reward only)".to_string(), 0.612),
        ("base model".to_string(), f64::NAN),
        ("only in the paper".to_string(), 0.7),
    ];
    let path = dir.path().join("ablation.png");
    bar_plot(
        "Held-out accuracy by variant",
        "accuracy",
        &bars,
        Some(&reference),
        &path,
    )
    .unwrap();
    // Nine bar groups and one group of the paper's alone.
    let img = assert_drawn(&path, (bar_plot_width(10), BAR_PLOT_HEIGHT));
    assert!(bar_plot_width(10) > 800);
    assert!(img.count(BLUE) > 5000, "bars: {}", img.count(BLUE));
    assert!(
        img.count(ORANGE) > 2000,
        "reference bars: {}",
        img.count(ORANGE)
    );

    // Without reference values: no second colour.
    let path = dir.path().join("plain.png");
    bar_plot("Plain", "accuracy", &bars[..3], None, &path).unwrap();
    let img = assert_drawn(&path, (bar_plot_width(3), BAR_PLOT_HEIGHT));
    assert_eq!(bar_plot_width(3), 800);
    assert!(img.count(BLUE) > 5000);
    assert_eq!(img.count(ORANGE), 0);

    // Negative means draw downwards without trouble.
    let path = dir.path().join("negative.png");
    let bars = vec![
        ("up".to_string(), 0.5, 0.1),
        ("down".to_string(), -0.3, 0.2),
    ];
    bar_plot("Signed", "delta", &bars, None, &path).unwrap();
    assert_drawn(&path, (800, BAR_PLOT_HEIGHT));
}

#[test]
fn an_empty_bar_plot_says_no_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.png");
    bar_plot("Nothing", "accuracy", &[], None, &path).unwrap();
    let img = assert_drawn(&path, (800, BAR_PLOT_HEIGHT));
    assert!(img.count([120, 120, 120]) > 50);

    let path = dir.path().join("all_nan.png");
    let bars = vec![("a".to_string(), f64::NAN, f64::NAN)];
    bar_plot("All NaN", "accuracy", &bars, Some(&[]), &path).unwrap();
    let img = assert_drawn(&path, (800, BAR_PLOT_HEIGHT));
    assert!(img.count([120, 120, 120]) > 50);
}
