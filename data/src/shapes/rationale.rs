//! Chains of thought whose text alone determines the answer (`RationaleKind`).

use serde::{Deserialize, Serialize};

use super::{
    COLUMNS, Colour, Filter, Object, Query, ROWS, Relation, Scene, Shape, cell_name, find,
    reading_order,
};

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
    pub(super) fn is_scene(&self) -> bool {
        *self == Self::Scene
    }

    /// This kind's chain of thought for `query` in `scene`; `None` where the kind has none for
    /// the question.
    pub fn text(self, scene: &Scene, query: &Query) -> Option<String> {
        match self {
            Self::Scene => Some(rationale(scene)),
            Self::Focused => focused_rationale(scene, query),
            Self::Stepwise => {
                focused_rationale(scene, query).map(|f| format!("{}. {f}", rationale(scene)))
            }
            Self::Tally => tally_rationale(scene, query),
            Self::Lookup => lookup_rationale(scene, query),
        }
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
