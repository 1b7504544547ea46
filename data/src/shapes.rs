//! `shapes`: a synthetic visual question-answering benchmark with exact answers.
//!
//! Each scene is a small image with 1..=N coloured shapes placed in distinct cells of a 3x3 grid
//! (with jitter, two sizes, optional pixel noise). Questions come from seven families — colour
//! of a shape, shape of a colour, counting, spatial relations, existence, count comparison and
//! arithmetic over counts — and are answered from the scene description, which every row keeps
//! (`scene`, `query`) so answers can be recomputed. Everything is a pure function of the seed.

use std::io::Write;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::types::AnswerType;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

pub const SHAPES: [Shape; 4] = [
    Shape::Circle,
    Shape::Square,
    Shape::Triangle,
    Shape::Diamond,
];
pub const COLOURS: [Colour; 6] = [
    Colour::Red,
    Colour::Green,
    Colour::Blue,
    Colour::Yellow,
    Colour::Purple,
    Colour::Orange,
];

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Self::Circle => "circle",
            Self::Square => "square",
            Self::Triangle => "triangle",
            Self::Diamond => "diamond",
        }
    }
    pub fn plural(self) -> &'static str {
        match self {
            Self::Circle => "circles",
            Self::Square => "squares",
            Self::Triangle => "triangles",
            Self::Diamond => "diamonds",
        }
    }
}

impl Colour {
    pub fn name(self) -> &'static str {
        match self {
            Self::Red => "red",
            Self::Green => "green",
            Self::Blue => "blue",
            Self::Yellow => "yellow",
            Self::Purple => "purple",
            Self::Orange => "orange",
        }
    }
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Self::Red => [220, 40, 40],
            Self::Green => [40, 170, 60],
            Self::Blue => [50, 80, 220],
            Self::Yellow => [230, 210, 40],
            Self::Purple => [140, 60, 180],
            Self::Orange => [240, 140, 30],
        }
    }
}

/// One shape in a scene; `x`, `y` are the centre in pixels, `radius` its half-extent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub x: u32,
    pub y: u32,
    pub radius: u32,
    /// Grid cell (column, row) the object occupies; distinct per object.
    pub cell: (u32, u32),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub width: u32,
    pub height: u32,
    pub objects: Vec<Object>,
}

/// Which objects a counting question is about (`None` = any).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub colour: Option<Colour>,
    pub shape: Option<Shape>,
}

impl Filter {
    pub fn matches(&self, o: &Object) -> bool {
        self.colour.is_none_or(|c| c == o.colour) && self.shape.is_none_or(|s| s == o.shape)
    }
    fn describe_plural(&self) -> String {
        match (self.colour, self.shape) {
            (Some(c), Some(s)) => format!("{} {}", c.name(), s.plural()),
            (Some(c), None) => format!("{} objects", c.name()),
            (None, Some(s)) => s.plural().to_string(),
            (None, None) => "objects".to_string(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Relation {
    Left,
    Right,
    Above,
    Below,
}

impl Relation {
    fn phrase(self) -> &'static str {
        match self {
            Self::Left => "to the left of",
            Self::Right => "to the right of",
            Self::Above => "above",
            Self::Below => "below",
        }
    }
}

/// A question, by family, with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum Query {
    /// "What colour is the {shape}?" (the shape is unique in the scene).
    Colour { shape: Shape },
    /// "What shape is the {colour} object?" (the colour is unique).
    Shape { colour: Colour },
    /// "How many {filter} are there?"
    Count { filter: Filter },
    /// "Is the {a} {relation} the {b}?" (a and b are unique colour+shape descriptions).
    Relation {
        a: (Colour, Shape),
        b: (Colour, Shape),
        relation: Relation,
    },
    /// "Is there a {colour} {shape}?"
    Exists { colour: Colour, shape: Shape },
    /// "Are there more {a} than {b}?"
    Compare { a: Filter, b: Filter },
    /// "How many {a} and {b} are there in total?" / "How many more {a} than {b} are there?"
    Arithmetic {
        a: Filter,
        b: Filter,
        subtract: bool,
    },
    /// "Describe the image.": every object in reading order (rows top to bottom, then columns
    /// left to right) as "{row} {column}: {size} {colour} {shape}", joined by "; ". A dense
    /// captioning task for pre-training the vision path (LLaVA's first stage); not in the
    /// default question mix.
    Describe,
}

/// Every question family, in the order of [`Query::family`]'s names.
pub const FAMILIES: [&str; 8] = [
    "colour",
    "shape",
    "count",
    "relation",
    "exists",
    "compare",
    "arithmetic",
    "describe",
];

/// The families a benchmark draws from unless told otherwise: all but `describe` (the last).
pub const DEFAULT_FAMILIES: &[&str] = FAMILIES.split_at(FAMILIES.len() - 1).0;

impl Query {
    pub fn family(&self) -> &'static str {
        match self {
            Self::Colour { .. } => "colour",
            Self::Shape { .. } => "shape",
            Self::Count { .. } => "count",
            Self::Relation { .. } => "relation",
            Self::Exists { .. } => "exists",
            Self::Compare { .. } => "compare",
            Self::Arithmetic { .. } => "arithmetic",
            Self::Describe => "describe",
        }
    }

    pub fn answer_type(&self) -> AnswerType {
        match self {
            Self::Colour { .. } | Self::Shape { .. } | Self::Describe => AnswerType::Exact,
            Self::Count { .. } | Self::Arithmetic { .. } => AnswerType::Number,
            Self::Relation { .. } | Self::Exists { .. } | Self::Compare { .. } => AnswerType::YesNo,
        }
    }

    pub fn question(&self) -> String {
        match self {
            Self::Colour { shape } => format!("What colour is the {}?", shape.name()),
            Self::Shape { colour } => format!("What shape is the {} object?", colour.name()),
            Self::Count { filter } => format!("How many {} are there?", filter.describe_plural()),
            Self::Relation { a, b, relation } => format!(
                "Is the {} {} {} the {} {}?",
                a.0.name(),
                a.1.name(),
                relation.phrase(),
                b.0.name(),
                b.1.name()
            ),
            Self::Exists { colour, shape } => {
                format!("Is there a {} {}?", colour.name(), shape.name())
            }
            Self::Compare { a, b } => format!(
                "Are there more {} than {}?",
                a.describe_plural(),
                b.describe_plural()
            ),
            Self::Describe => "Describe the image.".to_string(),
            Self::Arithmetic { a, b, subtract } => {
                if *subtract {
                    format!(
                        "How many more {} than {} are there?",
                        a.describe_plural(),
                        b.describe_plural()
                    )
                } else {
                    format!(
                        "How many {} and {} are there in total?",
                        a.describe_plural(),
                        b.describe_plural()
                    )
                }
            }
        }
    }
}

fn count(scene: &Scene, f: &Filter) -> usize {
    scene.objects.iter().filter(|o| f.matches(o)).count()
}

fn find(scene: &Scene, c: Colour, s: Shape) -> Option<&Object> {
    scene.objects.iter().find(|o| o.colour == c && o.shape == s)
}

/// The worked reasoning written into every non-`describe` row (`rationale`): the objects in
/// reading order with the attributes the questions ask about, "top left: red circle; middle
/// centre: blue square" ("nothing" for an empty scene). Reading the image cell by cell and
/// then answering from the list is the chain of thought the reasoning teachers learn.
pub fn rationale(scene: &Scene) -> String {
    if scene.objects.is_empty() {
        return "nothing".to_string();
    }
    reading_order(scene)
        .iter()
        .map(|o| format!("{}: {} {}", cell_name(o), o.colour.name(), o.shape.name()))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Which worked reasoning `ril data synth` writes into a row's `rationale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RationaleKind {
    /// The whole scene cell by cell ([`rationale`]); the answer is then read off the list.
    #[default]
    Scene,
    /// Only what the question is about ([`focused_rationale`]): the objects it names with
    /// their cells, or the objects a count covers and how many; the answer then follows in one
    /// short step (a copy, a comparison of two cells or two counts, a sum).
    Focused,
    /// Both, in that order: the scene cell by cell, then the focused step read off that list
    /// ("top left: red circle; middle right: blue square. the circle: top left, red"), so the
    /// last steps look up text already written instead of searching the image again.
    Stepwise,
    /// The scene cell by cell, each object marked as it is read with what it means for the
    /// question ([`tally_rationale`]): a running count, the attribute asked for, or which of
    /// the two named objects it is; then the counts or cells the answer follows from. No step
    /// searches back through the list.
    Tally,
    /// The scene object first, "red circle at top left; blue square at middle right", then
    /// the focused step ([`lookup_rationale`]). Every look-up the focused step makes copies
    /// what follows a match in the list (the cell after "red circle at", the shape after
    /// "red") or the word just before it (the colour before "circle"); `stepwise` asks for
    /// the cell two words before a shape.
    Lookup,
}

impl RationaleKind {
    fn is_scene(&self) -> bool {
        *self == Self::Scene
    }
}

/// The question-specific chain of thought: where the objects the question names are and what
/// they are, or which objects a count covers and how many:
/// - colour / shape: "the circle: top left, red" / "the red object: top left, circle";
/// - count and exists: "red circles: top left, bottom right (2)" ("none (0)" when there are none);
/// - relation: "the red circle: top left; the blue square: middle right";
/// - compare and arithmetic: both counts, "red objects: top left (1); circles: none (0)".
///
/// `describe` has none (its answer is the scene list itself).
pub fn focused_rationale(scene: &Scene, query: &Query) -> Option<String> {
    let at = |c: Colour, s: Shape| -> String {
        find(scene, c, s).map_or("nowhere".to_string(), cell_name)
    };
    let listing = |f: &Filter| -> String {
        let cells: Vec<String> = reading_order(scene)
            .into_iter()
            .filter(|o| f.matches(o))
            .map(cell_name)
            .collect();
        let n = cells.len();
        let cells = if cells.is_empty() {
            "none".to_string()
        } else {
            cells.join(", ")
        };
        format!("{}: {cells} ({n})", f.describe_plural())
    };
    Some(match query {
        Query::Colour { shape } => {
            let o = scene.objects.iter().find(|o| o.shape == *shape)?;
            format!(
                "the {}: {}, {}",
                shape.name(),
                cell_name(o),
                o.colour.name()
            )
        }
        Query::Shape { colour } => {
            let o = scene.objects.iter().find(|o| o.colour == *colour)?;
            format!(
                "the {} object: {}, {}",
                colour.name(),
                cell_name(o),
                o.shape.name()
            )
        }
        Query::Count { filter } => listing(filter),
        Query::Exists { colour, shape } => listing(&Filter {
            colour: Some(*colour),
            shape: Some(*shape),
        }),
        Query::Relation { a, b, .. } => format!(
            "the {} {}: {}; the {} {}: {}",
            a.0.name(),
            a.1.name(),
            at(a.0, a.1),
            b.0.name(),
            b.1.name(),
            at(b.0, b.1)
        ),
        Query::Compare { a, b } | Query::Arithmetic { a, b, .. } => {
            format!("{}; {}", listing(a), listing(b))
        }
        Query::Describe => return None,
    })
}

/// The scene in reading order, each object marked with what it means for the question:
/// - colour / shape: the object asked about gets "= {its colour / shape}":
///   "top left: red diamond; middle left: blue circle = blue";
/// - count and exists: a running count over the objects that match, "= 1", "= 2", ...;
///   then "so N";
/// - compare and arithmetic: running counts "= a1", "= b1", "= a2 b2" (an object may match
///   both); then "so a N1, b N2";
/// - relation: the two objects named get "= a" and "= b"; then "so a {cell}, b {cell}".
///
/// `None` for `describe` (its answer is the list itself). An empty scene is "nothing".
pub fn tally_rationale(scene: &Scene, query: &Query) -> Option<String> {
    let objects = reading_order(scene);
    let item = |o: &Object| format!("{}: {} {}", cell_name(o), o.colour.name(), o.shape.name());
    let list = |marks: &[String]| -> String {
        if objects.is_empty() {
            return "nothing".to_string();
        }
        objects
            .iter()
            .zip(marks)
            .map(|(o, m)| {
                if m.is_empty() {
                    item(o)
                } else {
                    format!("{} = {m}", item(o))
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    // Running counts for one or two filters: marks, and the totals.
    let tally = |filters: &[&Filter]| -> (Vec<String>, Vec<usize>) {
        let mut counts = vec![0usize; filters.len()];
        let marks = objects
            .iter()
            .map(|o| {
                let mut m = Vec::new();
                for (i, f) in filters.iter().enumerate() {
                    if f.matches(o) {
                        counts[i] += 1;
                        m.push(if filters.len() == 1 {
                            counts[i].to_string()
                        } else {
                            format!("{}{}", ["a", "b"][i], counts[i])
                        });
                    }
                }
                m.join(" ")
            })
            .collect();
        (marks, counts)
    };
    // The object asked about marked with the attribute asked for.
    let mark_where = |mark: &dyn Fn(&Object) -> Option<&'static str>| -> String {
        let marks: Vec<String> = objects
            .iter()
            .map(|o| mark(o).unwrap_or_default().to_string())
            .collect();
        list(&marks)
    };
    Some(match query {
        Query::Colour { shape } => mark_where(&|o| (o.shape == *shape).then(|| o.colour.name())),
        Query::Shape { colour } => mark_where(&|o| (o.colour == *colour).then(|| o.shape.name())),
        Query::Count { filter } => {
            let (marks, counts) = tally(&[filter]);
            format!("{}. so {}", list(&marks), counts[0])
        }
        Query::Exists { colour, shape } => {
            let f = Filter {
                colour: Some(*colour),
                shape: Some(*shape),
            };
            let (marks, counts) = tally(&[&f]);
            format!("{}. so {}", list(&marks), counts[0])
        }
        Query::Compare { a, b } | Query::Arithmetic { a, b, .. } => {
            let (marks, counts) = tally(&[a, b]);
            format!("{}. so a {}, b {}", list(&marks), counts[0], counts[1])
        }
        Query::Relation { a, b, .. } => {
            let is = |o: &Object, x: (Colour, Shape)| o.colour == x.0 && o.shape == x.1;
            let marks: Vec<String> = objects
                .iter()
                .map(|o| {
                    if is(o, *a) {
                        "a".to_string()
                    } else if is(o, *b) {
                        "b".to_string()
                    } else {
                        String::new()
                    }
                })
                .collect();
            let cell =
                |x: (Colour, Shape)| find(scene, x.0, x.1).map_or("nowhere".into(), cell_name);
            format!("{}. so a {}, b {}", list(&marks), cell(*a), cell(*b))
        }
        Query::Describe => return None,
    })
}

/// The `lookup` rationale: the scene object first ("red circle at top left; blue square at
/// middle right", "nothing" when empty), ". ", then the focused step: colour and shape
/// questions name only the attribute asked for ("the circle: red", "the red object: circle");
/// relation questions add the two cells compared along the question's axis and the relation
/// asked ("the red circle: top left; the blue square: middle right; top is above middle
/// (asked: below)"); the other families are
/// written as [`focused_rationale`] writes them. `None` for `describe`.
pub fn lookup_rationale(scene: &Scene, query: &Query) -> Option<String> {
    let list = if scene.objects.is_empty() {
        "nothing".to_string()
    } else {
        reading_order(scene)
            .iter()
            .map(|o| format!("{} {} at {}", o.colour.name(), o.shape.name(), cell_name(o)))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let focus = match query {
        Query::Colour { shape } => {
            let o = scene.objects.iter().find(|o| o.shape == *shape)?;
            format!("the {}: {}", shape.name(), o.colour.name())
        }
        Query::Shape { colour } => {
            let o = scene.objects.iter().find(|o| o.colour == *colour)?;
            format!("the {} object: {}", colour.name(), o.shape.name())
        }
        Query::Relation { a, b, relation } => {
            let cells = focused_rationale(scene, query)?;
            match (find(scene, a.0, a.1), find(scene, b.0, b.1)) {
                // The two cells compared along the question's axis, in words, and the relation
                // asked about beside it, so the answer compares two words next to each other:
                // "top is above middle (asked: below)".
                (Some(oa), Some(ob)) => {
                    let (x, y, words, before, after) = match relation {
                        Relation::Left | Relation::Right => {
                            (oa.cell.0, ob.cell.0, COLUMNS, "left of", "right of")
                        }
                        Relation::Above | Relation::Below => {
                            (oa.cell.1, ob.cell.1, ROWS, "above", "below")
                        }
                    };
                    let verdict = match x.cmp(&y) {
                        std::cmp::Ordering::Less => before,
                        std::cmp::Ordering::Greater => after,
                        std::cmp::Ordering::Equal => "level with",
                    };
                    let word = |i: u32| words[i as usize % 3];
                    // The question's own words, less "to the": "left of", "above".
                    let asked = relation.phrase().trim_start_matches("to the ");
                    format!(
                        "{cells}; {} is {verdict} {} (asked: {asked})",
                        word(x),
                        word(y)
                    )
                }
                _ => cells,
            }
        }
        _ => focused_rationale(scene, query)?,
    };
    Some(format!("{list}. {focus}"))
}

fn reading_order(scene: &Scene) -> Vec<&Object> {
    let mut objects: Vec<&Object> = scene.objects.iter().collect();
    objects.sort_by_key(|o| (o.cell.1, o.cell.0));
    objects
}

/// The grid's rows and columns as the rationales name them.
const ROWS: [&str; 3] = ["top", "middle", "bottom"];
const COLUMNS: [&str; 3] = ["left", "centre", "right"];

fn cell_name(o: &Object) -> String {
    format!(
        "{} {}",
        ROWS[o.cell.1 as usize % 3],
        COLUMNS[o.cell.0 as usize % 3]
    )
}

/// "top left: large red circle; middle centre: small blue square" (reading order).
pub fn describe(scene: &Scene) -> String {
    reading_order(scene)
        .iter()
        .map(|o| {
            let size = match o.size {
                Size::Small => "small",
                Size::Large => "large",
            };
            format!(
                "{}: {size} {} {}",
                cell_name(o),
                o.colour.name(),
                o.shape.name()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// The answer to `query` in `scene`, or `None` when the question does not apply (e.g. the
/// shape asked about is not unique).
pub fn answer(scene: &Scene, query: &Query) -> Option<String> {
    match query {
        Query::Colour { shape } => {
            let mut it = scene.objects.iter().filter(|o| o.shape == *shape);
            let o = it.next()?;
            it.next().is_none().then(|| o.colour.name().to_string())
        }
        Query::Shape { colour } => {
            let mut it = scene.objects.iter().filter(|o| o.colour == *colour);
            let o = it.next()?;
            it.next().is_none().then(|| o.shape.name().to_string())
        }
        Query::Count { filter } => Some(count(scene, filter).to_string()),
        Query::Relation { a, b, relation } => {
            let unique = |c: Colour, s: Shape| {
                scene
                    .objects
                    .iter()
                    .filter(|o| o.colour == c && o.shape == s)
                    .count()
                    == 1
            };
            if !unique(a.0, a.1) || !unique(b.0, b.1) || a == b {
                return None;
            }
            let (oa, ob) = (find(scene, a.0, a.1)?, find(scene, b.0, b.1)?);
            // Only ask along an axis where the objects sit in different grid cells, so the
            // answer is unambiguous to a viewer.
            match relation {
                Relation::Left | Relation::Right if oa.cell.0 == ob.cell.0 => None,
                Relation::Above | Relation::Below if oa.cell.1 == ob.cell.1 => None,
                Relation::Left => Some(yes_no(oa.x < ob.x)),
                Relation::Right => Some(yes_no(oa.x > ob.x)),
                Relation::Above => Some(yes_no(oa.y < ob.y)),
                Relation::Below => Some(yes_no(oa.y > ob.y)),
            }
        }
        Query::Exists { colour, shape } => Some(yes_no(find(scene, *colour, *shape).is_some())),
        Query::Compare { a, b } => {
            let (na, nb) = (count(scene, a), count(scene, b));
            (na != nb).then(|| yes_no(na > nb))
        }
        Query::Arithmetic { a, b, subtract } => {
            let (na, nb) = (count(scene, a), count(scene, b));
            if *subtract {
                (na > nb).then(|| (na - nb).to_string())
            } else {
                Some((na + nb).to_string())
            }
        }
        Query::Describe => Some(describe(scene)),
    }
}

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

fn inside(shape: Shape, dx: f32, dy: f32, r: f32) -> bool {
    match shape {
        Shape::Circle => dx * dx + dy * dy <= r * r,
        Shape::Square => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
        Shape::Diamond => dx.abs() + dy.abs() <= r,
        // Upward triangle: apex at (0, -r), base at y = +r.
        Shape::Triangle => dy <= r && dy >= -r && dx.abs() <= (dy + r) / 2.0,
    }
}

/// Renders a scene to RGB pixels on `background`, with optional uniform noise.
pub fn render(
    scene: &Scene,
    background: [u8; 3],
    noise: f32,
    rng: &mut ChaCha8Rng,
) -> image::RgbImage {
    let mut img = image::RgbImage::from_pixel(scene.width, scene.height, image::Rgb(background));
    for o in &scene.objects {
        let r = o.radius as f32;
        let x0 = o.x.saturating_sub(o.radius);
        let y0 = o.y.saturating_sub(o.radius);
        for y in y0..=(o.y + o.radius).min(scene.height - 1) {
            for x in x0..=(o.x + o.radius).min(scene.width - 1) {
                if inside(o.shape, x as f32 - o.x as f32, y as f32 - o.y as f32, r) {
                    img.put_pixel(x, y, image::Rgb(o.colour.rgb()));
                }
            }
        }
    }
    if noise > 0.0 {
        let amp = noise * 255.0;
        for px in img.pixels_mut() {
            for c in px.0.iter_mut() {
                let v = *c as f32 + rng.random_range(-amp..=amp);
                *c = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    img
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
/// with the settings. Returns the number of rows per split.
pub fn write_dataset(cfg: &SynthConfig, out: &Path) -> Result<[usize; 3]> {
    cfg.validate()?;
    let splits = [
        ("train", cfg.n_train),
        ("val", cfg.n_val),
        ("test", cfg.n_test),
    ];
    std::fs::create_dir_all(out).map_err(|e| DataError::io(out, e))?;
    for (split_index, (name, n)) in splits.iter().enumerate() {
        let img_dir = out.join("images").join(name);
        std::fs::create_dir_all(&img_dir).map_err(|e| DataError::io(&img_dir, e))?;
        let path = out.join(format!("{name}.jsonl"));
        let tmp = out.join(format!(".{name}.jsonl.tmp"));
        let file = std::fs::File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        for i in 0..*n {
            let g = generate_row(cfg, split_index, i, name)?;
            let rel = format!("images/{name}/{}.png", g.id);
            let img_path = out.join(&rel);
            std::fs::write(&img_path, &g.png).map_err(|e| DataError::io(&img_path, e))?;
            let mut row = serde_json::json!({
                "id": g.id,
                "images": [rel],
                "question": g.query.question(),
                "answer": g.answer,
                "answer_type": g.query.answer_type(),
                "family": g.query.family(),
                "query": g.query,
                "scene": g.scene,
            });
            // A caption's reasoning would repeat the answer itself.
            if cfg.rationale && !matches!(g.query, Query::Describe) {
                let r = match cfg.rationale_kind {
                    RationaleKind::Scene => Some(rationale(&g.scene)),
                    RationaleKind::Focused => focused_rationale(&g.scene, &g.query),
                    RationaleKind::Stepwise => focused_rationale(&g.scene, &g.query)
                        .map(|f| format!("{}. {f}", rationale(&g.scene))),
                    RationaleKind::Tally => tally_rationale(&g.scene, &g.query),
                    RationaleKind::Lookup => lookup_rationale(&g.scene, &g.query),
                };
                if let Some(r) = r {
                    row["rationale"] = r.into();
                }
            }
            writeln!(w, "{row}").map_err(|e| DataError::io(&tmp, e))?;
        }
        w.flush().map_err(|e| DataError::io(&tmp, e))?;
        drop(w);
        std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))?;
    }
    let meta = serde_json::to_string_pretty(cfg).map_err(|e| DataError::Invalid(e.to_string()))?;
    std::fs::write(out.join("synth.json"), meta).map_err(|e| DataError::io(out, e))?;
    Ok([cfg.n_train, cfg.n_val, cfg.n_test])
}
