//! The training run's plots from the learner's `metrics.jsonl`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::{Chart, LINE_PLOT_SIZE, Layer, LayerKind, PlotError, draw_chart, palette, render};

/// Width of the centred moving average drawn over per-step series.
const SMOOTH_WINDOW: usize = 5;

/// The reward series of `rewards.png`: `(metrics.jsonl key, legend label)`.
const REWARD_KEYS: [(&str, &str); 6] = [
    ("reward_ans_student_mean", "R_ans, student"),
    ("reward_ans_teacher_mean", "R_ans, teacher"),
    ("reward_sim_student_mean", "R_sim, student"),
    ("reward_sim_teacher_mean", "R_sim, teacher"),
    ("reward_student_mean", "R total, student"),
    ("reward_teacher_mean", "R total, teacher"),
];

/// Writes the run's plots into `out_dir` (created if missing) and returns their paths, in this
/// order:
///
/// - `rewards.png`: the reward components over steps — `reward_ans_{student,teacher}_mean`,
///   `reward_sim_{student,teacher}_mean` — and the total `reward_{student,teacher}_mean`;
/// - `discriminator.png`: `d_accuracy` over steps, y in [0, 1], with a dashed 0.5 (chance)
///   line;
/// - `kl.png`: two panels sharing the step axis, `kl_mean` (KL to the reference policy) above
///   and `entropy_mean` below (their scales differ by orders of magnitude);
/// - `accuracy.png`: held-out accuracy over steps from `accuracy` (`(step, accuracy)`), y in
///   [0, 1].
///
/// `metrics_jsonl` has one JSON object per line; the step is its `version`. Keys may be
/// missing or `null` (the learner writes non-finite values as `null`) on any line; a line
/// without a numeric `version` is skipped, and so are blank lines. A line that is not a JSON
/// object is an error naming the file and the line, except a last line without its newline,
/// which is a line still being written (or torn by a crash) and is ignored. Per-step series
/// with more than 5 points are drawn faintly, under a bold centred 5-step moving average. A
/// plot whose series have no point at all (an empty file, a run without teachers) is still
/// written, saying "no data".
pub fn metrics_plots(
    metrics_jsonl: &Path,
    out_dir: &Path,
    accuracy: &[(f64, f64)],
) -> Result<Vec<PathBuf>, PlotError> {
    let series = read_metrics(metrics_jsonl)?;
    let get = |key: &str| series.get(key).cloned().unwrap_or_default();
    std::fs::create_dir_all(out_dir).map_err(|source| PlotError::Write {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let smoothed_note = "step (faint: per step; bold: 5-step moving average)";
    let mut written = Vec::new();
    // A file holding one chart with its title.
    let single = |name: &str, chart: &Chart| -> Result<PathBuf, PlotError> {
        let path = out_dir.join(name);
        render(&path, LINE_PLOT_SIZE, |root| draw_chart(root, chart, true))?;
        Ok(path)
    };

    let rewards = Chart {
        title: "Reward components".into(),
        x_label: smoothed_note.into(),
        y_label: "mean reward".into(),
        layers: REWARD_KEYS
            .iter()
            .enumerate()
            .flat_map(|(i, (key, label))| smoothed_layers(label, get(key), palette(i)))
            .collect(),
        hlines: Vec::new(),
        y_range: None,
    };
    written.push(single("rewards.png", &rewards)?);

    let discriminator = Chart {
        title: "Discriminator accuracy".into(),
        x_label: smoothed_note.into(),
        y_label: "accuracy".into(),
        layers: smoothed_layers("D accuracy", get("d_accuracy"), palette(0)),
        hlines: vec![("chance (0.5)".into(), 0.5)],
        y_range: Some((0.0, 1.0)),
    };
    written.push(single("discriminator.png", &discriminator)?);

    let kl = Chart {
        title: String::new(),
        x_label: String::new(),
        y_label: "KL per token".into(),
        layers: smoothed_layers("KL to reference (kl_mean)", get("kl_mean"), palette(3)),
        hlines: Vec::new(),
        y_range: None,
    };
    let entropy = Chart {
        title: String::new(),
        x_label: smoothed_note.into(),
        y_label: "nats per token".into(),
        layers: smoothed_layers("entropy (entropy_mean)", get("entropy_mean"), palette(4)),
        hlines: Vec::new(),
        y_range: None,
    };
    let path = out_dir.join("kl.png");
    render(&path, LINE_PLOT_SIZE, |root| {
        let root = root.titled(
            "KL to the reference policy and policy entropy",
            crate::font(22.0),
        )?;
        let (top, bottom) = root.split_vertically(root.dim_in_pixel().1 / 2 - 10);
        draw_chart(&top, &kl, false)?;
        draw_chart(&bottom, &entropy, false)
    })?;
    written.push(path);

    let held_out = Chart {
        title: "Held-out accuracy".into(),
        x_label: "step".into(),
        y_label: "accuracy".into(),
        layers: vec![Layer {
            label: Some("held-out accuracy".into()),
            points: accuracy.to_vec(),
            colour: palette(2),
            kind: LayerKind::Line,
        }],
        hlines: Vec::new(),
        y_range: Some((0.0, 1.0)),
    };
    written.push(single("accuracy.png", &held_out)?);

    Ok(written)
}

/// Every numeric key of every line of a `metrics.jsonl` as `(step, value)` points, in file
/// order (the step is the line's `version`). A line that is not a JSON object is an error
/// naming the file and line; a torn last line (no newline: still being written) is ignored.
pub fn read_metrics(path: &Path) -> Result<BTreeMap<String, Vec<(f64, f64)>>, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let complete = text.is_empty() || text.ends_with('\n');
    let count = text.lines().count();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parse_error = |message: String| PlotError::Parse {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if !complete && i + 1 == count => break,
            Err(e) => return Err(parse_error(format!("not JSON: {e}"))),
        };
        let Some(object) = value.as_object() else {
            return Err(parse_error("not a JSON object".into()));
        };
        let Some(step) = object.get("version").and_then(|v| v.as_f64()) else {
            continue;
        };
        for (key, v) in object {
            if let Some(v) = v.as_f64() {
                series.entry(key.clone()).or_default().push((step, v));
            }
        }
    }
    Ok(series)
}

/// A per-step series as layers: plain when short, else faint raw points under a bold moving
/// average.
fn smoothed_layers(label: &str, mut points: Vec<(f64, f64)>, colour: RGBColor) -> Vec<Layer> {
    points.retain(|(x, y)| x.is_finite() && y.is_finite());
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    if points.len() <= SMOOTH_WINDOW {
        return vec![Layer {
            label: Some(label.to_string()),
            points,
            colour,
            kind: LayerKind::Line,
        }];
    }
    let smooth = moving_average(&points, SMOOTH_WINDOW);
    vec![
        Layer {
            label: None,
            points,
            colour,
            kind: LayerKind::Raw,
        },
        Layer {
            label: Some(label.to_string()),
            points: smooth,
            colour,
            kind: LayerKind::Smooth,
        },
    ]
}

/// Centred moving average of the y values (the window shrinks at the ends).
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let half = window / 2;
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(points.len());
            let mean = points[lo..hi].iter().map(|p| p.1).sum::<f64>() / (hi - lo) as f64;
            (points[i].0, mean)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_average_is_centred_and_shrinks_at_the_ends() {
        let points: Vec<(f64, f64)> = (0..6).map(|i| (i as f64, i as f64)).collect();
        let avg = moving_average(&points, 5);
        let ys: Vec<f64> = avg.iter().map(|p| p.1).collect();
        assert_eq!(ys, vec![1.0, 1.5, 2.0, 3.0, 3.5, 4.0]);
        assert_eq!(avg[5].0, 5.0);
    }
}
