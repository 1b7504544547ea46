//! `shapes`: a synthetic visual question-answering benchmark with exact answers.
//!
//! Each scene is a small image with 1..=N coloured shapes placed in distinct cells of a 3x3 grid
//! (with jitter, two sizes, optional pixel noise). Questions come from seven families — colour
//! of a shape, shape of a colour, counting, spatial relations, existence, count comparison and
//! arithmetic over counts — and are answered from the scene description, which every row keeps
//! (`scene`, `query`) so answers can be recomputed. Everything is a pure function of the seed.

use serde::{Deserialize, Serialize};

use crate::types::AnswerType;

mod rationale;
mod render;
mod synth;

pub use rationale::{
    RationaleKind, focused_rationale, lookup_rationale, rationale, tally_rationale,
};
pub use render::render;
pub use synth::{
    CLIP_MEAN_GREY, Generated, SynthConfig, default_families, generate_row, random_query,
    random_scene, write_dataset,
};

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
