//! Writes sample plots (synthetic data) into a folder, to look at:
//! `cargo run -p ril-plot --example sample_plots -- /tmp/plots`.

use std::io::Write;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "plots".into()));
    std::fs::create_dir_all(&out)?;

    // A noisy synthetic run: rewards rise, D's accuracy falls towards chance, KL grows.
    let metrics = out.join("metrics.jsonl");
    let mut f = std::fs::File::create(&metrics)?;
    let mut noise = 0.5f64;
    let mut next = || {
        noise = (noise * 997.0 + 0.123).fract();
        noise - 0.5
    };
    for step in 1..=120u32 {
        let t = step as f64 / 120.0;
        let line = serde_json::json!({
            "iteration": step - 1,
            "version": step,
            "reward_ans_student_mean": 0.3 + 0.4 * t + 0.1 * next(),
            "reward_ans_teacher_mean": 0.75 + 0.05 * next(),
            "reward_sim_student_mean": 0.2 + 0.3 * t + 0.1 * next(),
            "reward_sim_teacher_mean": 0.6 - 0.1 * t + 0.1 * next(),
            "reward_student_mean": 0.5 + 0.7 * t + 0.1 * next(),
            "reward_teacher_mean": 1.35 - 0.05 * t + 0.1 * next(),
            "d_accuracy": if step % 17 == 0 { serde_json::Value::Null } else { (0.95 - 0.4 * t + 0.08 * next()).into() },
            "kl_mean": 0.002 * t * t * 10.0 + 0.001 * next().abs(),
            "entropy_mean": 1.8 - 0.5 * t + 0.05 * next(),
        });
        writeln!(f, "{line}")?;
    }
    drop(f);
    let accuracy: Vec<(f64, f64)> = (0..=6)
        .map(|i| (i as f64 * 20.0, 0.42 + 0.03 * i as f64))
        .collect();
    for path in ril_plot::metrics_plots(&metrics, &out, &accuracy)? {
        println!("{}", path.display());
    }

    let variants = [
        ("RIL, both teachers", 0.642, 0.011, Some(0.651)),
        ("RIL, teacher A only", 0.631, 0.014, Some(0.640)),
        ("RIL, teacher B only", 0.625, 0.009, None),
        ("GRPO (answer reward only)", 0.608, 0.012, Some(0.612)),
        ("RIL without answer reward", 0.571, 0.02, None),
        ("RIL, frozen discriminator", 0.615, 0.018, None),
        ("SFT on teacher answers", 0.590, 0.007, Some(0.596)),
        ("base model", 0.520, 0.0, Some(0.523)),
        (
            "RIL, similarity reward only (no LLM judge)",
            0.600,
            0.03,
            None,
        ),
    ];
    let bars: Vec<(String, f64, f64)> = variants
        .iter()
        .map(|(l, m, s, _)| (l.to_string(), *m, *s))
        .collect();
    let reference: Vec<(String, f64)> = variants
        .iter()
        .filter_map(|(l, _, _, r)| r.map(|r| (l.to_string(), r)))
        .collect();
    let path = out.join("ablation.png");
    ril_plot::bar_plot(
        "Held-out accuracy by variant (3 seeds)",
        "held-out accuracy",
        &bars,
        Some(&reference),
        &path,
    )?;
    println!("{}", path.display());
    Ok(())
}
