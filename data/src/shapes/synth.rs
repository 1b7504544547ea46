//! Random scenes and questions from a seed, and the dataset written to disk.

use std::io::Write;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::rationale::RationaleKind;
use super::render::render;
use super::{
    COLOURS, DEFAULT_FAMILIES, FAMILIES, Filter, Object, Query, Relation, SHAPES, Scene, Size,
    answer,
};
use crate::error::{DataError, Result};

/// Difficulty knobs and sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthConfig {
    pub seed: u64,
    pub n_train: usize,
    pub n_val: usize,
    pub n_test: usize,
    pub image_size: u32,
    pub min_objects: usize,
    pub max_objects: usize,
    /// Uniform pixel noise amplitude in [0, 1] (fraction of 255).
    pub noise: f32,
    /// How far an object may sit from its cell's centre, as a fraction in [0, 1] of the room
    /// it has (half the cell minus its radius).
    #[serde(default = "default_jitter")]
    pub jitter: f32,
    /// The question families to draw from, uniformly (names of [`FAMILIES`]).
    #[serde(default = "default_families")]
    pub families: Vec<String>,
    /// Background colour. The default is CLIP's normalisation mean, so empty image regions
    /// enter the vision tower as zeros and the linear patch embedding sees only the objects
    /// (a from-scratch tower learns colours about twice as fast as on a near-white background,
    /// docs/BENCHMARKS.md).
    #[serde(default = "default_background")]
    pub background: [u8; 3],
    /// Write each question's `rationale` (the scene cell by cell). Off gives the rows of
    /// datasets written before rationales existed, byte for byte.
    #[serde(default = "default_rationale")]
    pub rationale: bool,
    /// Which rationale: the whole scene (default) or only what the question is about.
    /// Not written when it is the default, so older datasets' synth.json stay as they were.
    #[serde(default, skip_serializing_if = "RationaleKind::is_scene")]
    pub rationale_kind: RationaleKind,
}

fn default_rationale() -> bool {
    true
}

/// CLIP's `image_mean` (0.481, 0.458, 0.408) in 8-bit.
pub const CLIP_MEAN_GREY: [u8; 3] = [123, 117, 104];

fn default_background() -> [u8; 3] {
    CLIP_MEAN_GREY
}

/// A quarter of the room: at full jitter a from-scratch vision tower did not learn shape (a
/// single object, "What shape is the object?", stayed at chance for 800 steps); at 0.25 it
/// did (docs/BENCHMARKS.md).
fn default_jitter() -> f32 {
    0.25
}

pub fn default_families() -> Vec<String> {
    DEFAULT_FAMILIES.iter().map(|f| f.to_string()).collect()
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            n_train: 2000,
            n_val: 200,
            n_test: 500,
            image_size: 64,
            min_objects: 1,
            max_objects: 5,
            noise: 0.05,
            jitter: default_jitter(),
            families: default_families(),
            background: default_background(),
            rationale: default_rationale(),
            rationale_kind: RationaleKind::default(),
        }
    }
}

impl SynthConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(DataError::Invalid(format!("shapes: {m}")));
        if self.image_size < 24 {
            return bad("image_size must be at least 24 pixels");
        }
        if self.min_objects == 0 || self.min_objects > self.max_objects || self.max_objects > 9 {
            return bad("need 1 <= min_objects <= max_objects <= 9 (a 3x3 grid)");
        }
        if !(0.0..=1.0).contains(&self.noise) {
            return bad("noise must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return bad("jitter must be in [0, 1]");
        }
        if self.families.is_empty() {
            return bad("families must name at least one question family");
        }
        if let Some(f) = self
            .families
            .iter()
            .find(|f| !FAMILIES.contains(&f.as_str()))
        {
            return Err(DataError::Invalid(format!(
                "shapes: unknown question family {f:?} (known: {})",
                FAMILIES.join(", ")
            )));
        }
        Ok(())
    }
}

/// The random stream of one row: a pure function of (seed, split, index), so asking for more
/// rows never changes the first ones.
fn row_rng(seed: u64, split: usize, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((split as u64) << 40) | index as u64);
    rng
}

pub fn random_scene(cfg: &SynthConfig, rng: &mut ChaCha8Rng) -> Scene {
    let n = rng.random_range(cfg.min_objects..=cfg.max_objects);
    let cell = cfg.image_size / 3;
    let mut cells: Vec<(u32, u32)> = (0..9).map(|i| (i % 3, i / 3)).collect();
    // Partial Fisher-Yates: the first n cells.
    for i in 0..n {
        let j = rng.random_range(i..cells.len());
        cells.swap(i, j);
    }
    let objects = cells[..n]
        .iter()
        .map(|&(cx, cy)| {
            let size = if rng.random_bool(0.5) {
                Size::Small
            } else {
                Size::Large
            };
            let radius = match size {
                Size::Small => (cell * 2 / 9).max(3),
                Size::Large => (cell * 4 / 11).max(5),
            };
            let slack = ((cell / 2 - radius) as f32 * cfg.jitter).floor() as u32;
            let jitter =
                |rng: &mut ChaCha8Rng| rng.random_range(0..=2 * slack) as i64 - slack as i64;
            let x = (cx * cell + cell / 2) as i64 + jitter(rng);
            let y = (cy * cell + cell / 2) as i64 + jitter(rng);
            Object {
                shape: SHAPES[rng.random_range(0..SHAPES.len())],
                colour: COLOURS[rng.random_range(0..COLOURS.len())],
                size,
                x: x as u32,
                y: y as u32,
                radius,
                cell: (cx, cy),
            }
        })
        .collect();
    Scene {
        width: cfg.image_size,
        height: cfg.image_size,
        objects,
    }
}

fn random_filter(scene: &Scene, rng: &mut ChaCha8Rng) -> Filter {
    // Half the time describe an object that is present, so counts are not mostly zero.
    let from_scene = rng.random_bool(0.6) && !scene.objects.is_empty();
    let (colour, shape) = if from_scene {
        let o = scene.objects[rng.random_range(0..scene.objects.len())];
        (o.colour, o.shape)
    } else {
        (
            COLOURS[rng.random_range(0..COLOURS.len())],
            SHAPES[rng.random_range(0..SHAPES.len())],
        )
    };
    match rng.random_range(0..3) {
        0 => Filter {
            colour: Some(colour),
            shape: None,
        },
        1 => Filter {
            colour: None,
            shape: Some(shape),
        },
        _ => Filter {
            colour: Some(colour),
            shape: Some(shape),
        },
    }
}

/// Draws a question that applies to `scene` from `families` (names of [`FAMILIES`], drawn
/// uniformly; inapplicable questions are redrawn).
pub fn random_query(scene: &Scene, families: &[String], rng: &mut ChaCha8Rng) -> Query {
    let indices: Vec<usize> = families
        .iter()
        .filter_map(|f| FAMILIES.iter().position(|k| k == f))
        .collect();
    for _ in 0..64 {
        let pick = |rng: &mut ChaCha8Rng| scene.objects[rng.random_range(0..scene.objects.len())];
        let family = if indices.is_empty() {
            rng.random_range(0..DEFAULT_FAMILIES.len())
        } else {
            indices[rng.random_range(0..indices.len())]
        };
        let q = match family {
            0 => Query::Colour {
                shape: pick(rng).shape,
            },
            1 => Query::Shape {
                colour: pick(rng).colour,
            },
            2 => Query::Count {
                filter: if rng.random_bool(0.2) {
                    Filter {
                        colour: None,
                        shape: None,
                    }
                } else {
                    random_filter(scene, rng)
                },
            },
            3 => {
                let (a, b) = (pick(rng), pick(rng));
                let relation = [
                    Relation::Left,
                    Relation::Right,
                    Relation::Above,
                    Relation::Below,
                ][rng.random_range(0..4)];
                Query::Relation {
                    a: (a.colour, a.shape),
                    b: (b.colour, b.shape),
                    relation,
                }
            }
            4 => {
                // Balance yes and no: ask about a present object or a random combination.
                let (colour, shape) = if rng.random_bool(0.5) {
                    let o = pick(rng);
                    (o.colour, o.shape)
                } else {
                    (
                        COLOURS[rng.random_range(0..COLOURS.len())],
                        SHAPES[rng.random_range(0..SHAPES.len())],
                    )
                };
                Query::Exists { colour, shape }
            }
            5 => Query::Compare {
                a: random_filter(scene, rng),
                b: random_filter(scene, rng),
            },
            6 => Query::Arithmetic {
                a: random_filter(scene, rng),
                b: random_filter(scene, rng),
                subtract: rng.random_bool(0.4),
            },
            _ => Query::Describe,
        };
        let degenerate = match &q {
            Query::Compare { a, b } | Query::Arithmetic { a, b, .. } => a == b,
            _ => false,
        };
        if !degenerate && answer(scene, &q).is_some() {
            return q;
        }
    }
    Query::Count {
        filter: Filter {
            colour: None,
            shape: None,
        },
    }
}

/// One generated row, before it is written.
#[derive(Debug, Clone)]
pub struct Generated {
    pub id: String,
    pub scene: Scene,
    pub query: Query,
    pub answer: String,
    pub png: Vec<u8>,
}

pub fn generate_row(
    cfg: &SynthConfig,
    split: usize,
    index: usize,
    split_name: &str,
) -> Result<Generated> {
    let mut rng = row_rng(cfg.seed, split, index);
    let scene = random_scene(cfg, &mut rng);
    let query = random_query(&scene, &cfg.families, &mut rng);
    let answer = answer(&scene, &query).ok_or_else(|| {
        DataError::Invalid(format!("shapes: no answer for {query:?} (a generator bug)"))
    })?;
    let img = render(&scene, cfg.background, cfg.noise, &mut rng);
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| DataError::Invalid(format!("encoding PNG: {e}")))?;
    Ok(Generated {
        id: format!("shapes-{split_name}-{index:06}"),
        scene,
        query,
        answer,
        png: png.into_inner(),
    })
}

/// Writes `DIR/{train,val,test}.jsonl` and `DIR/images/<split>/<id>.png`, plus `DIR/synth.json`
/// with the settings. Returns the number of rows per split. Each JSONL file appears whole or not
/// at all (written atomically after its images).
pub fn write_dataset(cfg: &SynthConfig, out: &Path) -> Result<[usize; 3]> {
    cfg.validate()?;
    let splits = [
        ("train", cfg.n_train),
        ("val", cfg.n_val),
        ("test", cfg.n_test),
    ];
    std::fs::create_dir_all(out).map_err(|e| DataError::io(out, e))?;
    for (split_index, (name, n)) in splits.iter().enumerate() {
        write_split(cfg, out, split_index, name, *n)?;
    }
    let meta = serde_json::to_string_pretty(cfg).map_err(|e| DataError::Invalid(e.to_string()))?;
    ril_common::fs::write_atomic(&out.join("synth.json"), meta.as_bytes())
        .map_err(|e| DataError::io(&e.path, e.source))?;
    Ok([cfg.n_train, cfg.n_val, cfg.n_test])
}

/// One split's images and its JSONL file.
fn write_split(
    cfg: &SynthConfig,
    out: &Path,
    split_index: usize,
    name: &str,
    n: usize,
) -> Result<()> {
    let img_dir = out.join("images").join(name);
    std::fs::create_dir_all(&img_dir).map_err(|e| DataError::io(&img_dir, e))?;
    // Rows stream into the file; a row that fails is kept whole and returned as it is.
    let mut row_failure = None;
    let written = ril_common::fs::write_atomic_with(&out.join(format!("{name}.jsonl")), |w| {
        for i in 0..n {
            let row = generate_row(cfg, split_index, i, name).and_then(|g| {
                let rel = format!("images/{name}/{}.png", g.id);
                let img_path = out.join(&rel);
                std::fs::write(&img_path, &g.png).map_err(|e| DataError::io(&img_path, e))?;
                Ok(jsonl_row(cfg, &g, &rel))
            });
            match row {
                Ok(row) => writeln!(w, "{row}")?,
                Err(e) => {
                    let message = e.to_string();
                    row_failure = Some(e);
                    return Err(std::io::Error::other(message));
                }
            }
        }
        Ok(())
    });
    match (written, row_failure) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(e)) => Err(e),
        (Err(e), None) => Err(DataError::io(&e.path, e.source)),
    }
}

/// A generated row as its JSONL object (with its rationale when the config asks for one).
fn jsonl_row(cfg: &SynthConfig, g: &Generated, image: &str) -> serde_json::Value {
    let mut row = serde_json::json!({
        "id": g.id,
        "images": [image],
        "question": g.query.question(),
        "answer": g.answer,
        "answer_type": g.query.answer_type(),
        "family": g.query.family(),
        "query": g.query,
        "scene": g.scene,
    });
    // A caption's reasoning would repeat the answer itself.
    if cfg.rationale
        && !matches!(g.query, Query::Describe)
        && let Some(r) = cfg.rationale_kind.text(&g.scene, &g.query)
    {
        row["rationale"] = r.into();
    }
    row
}
