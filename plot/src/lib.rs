//! PNG plots of a training run and of an ablation, for `ril demo` and `ril experiment ablation`.
//!
//! - [`line_plot`]: a line plot of one or more [`Series`] (one colour each, with a legend).
//! - [`metrics_plots`]: the run's plots from the learner's `metrics.jsonl` (reward components,
//!   discriminator accuracy, KL and entropy) plus held-out accuracy over steps.
//! - [`bar_plot`]: a bar chart of means with ± std error bars, optionally beside reference
//!   values (e.g. a paper's numbers).
//!
//! Drawing uses `plotters`' bitmap backend; text is rendered with a bundled DejaVu Sans
//! (`fonts/DejaVuSans.ttf`, licence in `fonts/LICENSE-DejaVu.txt`) through `ab_glyph`, so no
//! system font library (fontconfig, freetype) is needed. The PNG is encoded with `png`.
//!
//! Non-finite values (NaN, ±inf) are skipped everywhere; a plot without any finite point is
//! still written, as axes saying "no data".

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::chart::MeshStyle;
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

mod metrics;

pub use metrics::{metrics_plots, read_metrics};

/// Width and height in pixels of every line plot ([`line_plot`] and each of
/// [`metrics_plots`]' files).
pub const LINE_PLOT_SIZE: (u32, u32) = (800, 500);

/// Height in pixels of a [`bar_plot`]; its width is [`bar_plot_width`].
pub const BAR_PLOT_HEIGHT: u32 = 500;

/// Width in pixels of a [`bar_plot`] with `groups` bar groups (one per distinct label among the
/// bars and the reference values): 800, or 90 per group plus 120 where that is wider.
pub fn bar_plot_width(groups: usize) -> u32 {
    (90 * groups as u32 + 120).max(800)
}

/// Everything that can go wrong writing a plot. Each message names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// An input file could not be read.
    #[error("{}: reading: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line of an input file is not what was expected (1-based line number).
    #[error("{}: line {line}: {message}", .path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// The PNG (or its folder) could not be written.
    #[error("{}: writing: {source}", .path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Drawing or encoding the image failed.
    #[error("{}: drawing the plot: {message}", .path.display())]
    Draw { path: PathBuf, message: String },
}

/// One line of a [`LinePlot`]: `(x, y)` points, drawn in the given order. Points with a
/// non-finite coordinate are skipped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// The legend entry.
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line plot: see [`line_plot`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinePlot {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// A fixed y range (e.g. `(0.0, 1.0)` for an accuracy); `None` takes it from the data with
    /// a little padding. Points outside a fixed range are drawn at its edge.
    pub y_range: Option<(f64, f64)>,
}

/// Writes `plot` as an 800×500 PNG ([`LINE_PLOT_SIZE`]) at `path` (its folder is created).
///
/// Each series gets its own colour and a legend entry (a series without finite points is
/// listed as "label (no data)"); series with at most 60 points also get a marker at each
/// point. Ranges come from the data with 5 % padding; a zero-width range (constant data, a
/// single point) is widened. A plot without any finite point shows its axes and "no data".
pub fn line_plot(plot: &LinePlot, path: &Path) -> Result<(), PlotError> {
    let chart = Chart {
        title: plot.title.clone(),
        x_label: plot.x_label.clone(),
        y_label: plot.y_label.clone(),
        layers: plot
            .series
            .iter()
            .enumerate()
            .map(|(i, s)| Layer {
                label: Some(s.label.clone()),
                points: s.points.clone(),
                colour: palette(i),
                kind: LayerKind::Line,
            })
            .collect(),
        hlines: Vec::new(),
        y_range: plot.y_range,
    };
    render(path, LINE_PLOT_SIZE, |root| draw_chart(root, &chart, true))
}

/// Writes a bar chart of `bars` — `(label, mean, std)`, one bar each with a mean ± std error
/// bar — at `path` (its folder is created).
///
/// With `reference` (`(label, value)`, e.g. a paper's numbers), each value is drawn as a
/// second, differently coloured bar beside the bar of the same label (a label with no bar gets
/// a group of its own, after the bars), and the legend names both. Labels are wrapped under
/// their group. The image is [`bar_plot_width`] × [`BAR_PLOT_HEIGHT`] pixels. A non-finite
/// mean draws no bar ("n/a"); a non-finite std draws no error bar; without any finite value
/// the plot says "no data".
pub fn bar_plot(
    title: &str,
    y_label: &str,
    bars: &[(String, f64, f64)],
    reference: Option<&[(String, f64)]>,
    path: &Path,
) -> Result<(), PlotError> {
    let mut groups: Vec<BarGroup> = bars
        .iter()
        .map(|(label, mean, std)| BarGroup {
            label: label.clone(),
            bar: Some((*mean, *std)),
            reference: None,
        })
        .collect();
    for (label, value) in reference.unwrap_or(&[]) {
        match groups
            .iter_mut()
            .find(|g| &g.label == label && g.reference.is_none())
        {
            Some(g) => g.reference = Some(*value),
            None => groups.push(BarGroup {
                label: label.clone(),
                bar: None,
                reference: Some(*value),
            }),
        }
    }
    let size = (bar_plot_width(groups.len()), BAR_PLOT_HEIGHT);
    render(path, size, |root| {
        draw_bars(root, title, y_label, &groups, reference.is_some())
    })
}

// ---------------------------------------------------------------------------------------------
// Shared drawing machinery.

type DrawResult<T = ()> = Result<T, Box<dyn StdError>>;

const FONT: &str = "sans-serif";
static DEJAVU_SANS: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// Registers the bundled font with plotters once per process.
fn ensure_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU_SANS)
                .map_err(|_| "the bundled DejaVu Sans font could not be loaded".to_string())
        })
        .clone()
}

fn font(size: f64) -> FontDesc<'static> {
    (FONT, size).into_font()
}

/// A colour-blind-friendly-ish categorical palette (matplotlib's "tab10").
fn palette(i: usize) -> RGBColor {
    const COLOURS: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    COLOURS[i % COLOURS.len()]
}

const GREY: RGBColor = RGBColor(120, 120, 120);

/// Draws into an RGB buffer of `size` with `draw`, then encodes it as a PNG at `path`.
pub(crate) fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> DrawResult,
) -> Result<(), PlotError> {
    let draw_error = |message: String| PlotError::Draw {
        path: path.to_path_buf(),
        message,
    };
    ensure_font().map_err(draw_error)?;
    let mut buf = vec![255u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        let drawn = root
            .fill(&WHITE)
            .map_err(|e| Box::new(e) as Box<dyn StdError>)
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(|e| Box::new(e) as Box<dyn StdError>));
        drawn.map_err(|e| draw_error(e.to_string()))?;
    }
    let mut png_bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png_bytes, size.0, size.1);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder
            .write_header()
            .map_err(|e| draw_error(format!("encoding the PNG: {e}")))?;
        writer
            .write_image_data(&buf)
            .map_err(|e| draw_error(format!("encoding the PNG: {e}")))?;
        writer
            .finish()
            .map_err(|e| draw_error(format!("encoding the PNG: {e}")))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| PlotError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(path, png_bytes).map_err(|source| PlotError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// How a [`Layer`] is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum LayerKind {
    /// A 2 px line, with markers when there are few points.
    Line,
    /// Per-step values under a smoothed line: a faint 1 px line, no legend entry.
    Raw,
    /// A moving average over [`LayerKind::Raw`] points: a bold line.
    Smooth,
}

#[derive(Debug, Clone)]
pub(crate) struct Layer {
    /// The legend entry (`None`: none).
    pub label: Option<String>,
    pub points: Vec<(f64, f64)>,
    pub colour: RGBColor,
    pub kind: LayerKind,
}

/// One set of axes: the general form behind [`line_plot`] and [`metrics_plots`].
#[derive(Debug, Clone)]
pub(crate) struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub layers: Vec<Layer>,
    /// Dashed grey horizontal reference lines `(legend label, y)`.
    pub hlines: Vec<(String, f64)>,
    pub y_range: Option<(f64, f64)>,
}

const MARKER_MAX_POINTS: usize = 60;

fn finite_points(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect()
}

/// `(min, max)` of `values` padded by `pad` of the span; a zero span is widened, no values
/// give `None`.
fn padded_range(values: impl Iterator<Item = f64>, pad: f64) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return None;
    }
    Some(widen(lo, hi, pad))
}

fn widen(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    let span = hi - lo;
    if !span.is_finite() {
        return (lo.max(f64::MIN / 4.0), hi.min(f64::MAX / 4.0));
    }
    if span <= f64::EPSILON * lo.abs().max(hi.abs()).max(1e-300) {
        let half = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - half, hi + half);
    }
    (lo - span * pad, hi + span * pad)
}

/// A tick label formatter with as many decimals as the range needs.
fn tick_format(lo: f64, hi: f64) -> impl Fn(&f64) -> String {
    let span = (hi - lo).abs();
    let magnitude = lo.abs().max(hi.abs());
    let scientific = magnitude >= 1e6 || (span < 1e-4 && magnitude > 0.0);
    let decimals = if span > 0.0 {
        ((-(span / 5.0).log10()).ceil().max(0.0) as usize).min(6)
    } else {
        2
    };
    move |v: &f64| {
        if scientific {
            format!("{v:.2e}")
        } else {
            let s = format!("{v:.decimals$}");
            // "-0.00" looks odd on an axis.
            if s.trim_start_matches('-')
                .chars()
                .all(|c| c == '0' || c == '.')
            {
                s.trim_start_matches('-').to_string()
            } else {
                s
            }
        }
    }
}

/// The corner of the plot with the fewest data points near it, for the legend.
fn legend_corner(layers: &[Layer], x: (f64, f64), y: (f64, f64)) -> SeriesLabelPosition {
    let mut counts = [0usize; 4]; // UL, UR, LL, LR
    for layer in layers {
        for &(px, py) in &layer.points {
            let fx = (px - x.0) / (x.1 - x.0);
            let fy = (py - y.0) / (y.1 - y.0);
            if !(fx.is_finite() && fy.is_finite()) {
                continue;
            }
            let left = fx < 0.45;
            let right = fx > 0.55;
            let upper = fy > 0.55;
            let lower = fy < 0.45;
            if upper && left {
                counts[0] += 1;
            }
            if upper && right {
                counts[1] += 1;
            }
            if lower && left {
                counts[2] += 1;
            }
            if lower && right {
                counts[3] += 1;
            }
        }
    }
    // Ties prefer the upper right, then the others in reading order.
    let order = [1, 0, 3, 2];
    let best = order
        .iter()
        .copied()
        .min_by_key(|&i| counts[i])
        .unwrap_or(1);
    match best {
        0 => SeriesLabelPosition::UpperLeft,
        2 => SeriesLabelPosition::LowerLeft,
        3 => SeriesLabelPosition::LowerRight,
        _ => SeriesLabelPosition::UpperRight,
    }
}

/// "no data" in the middle of a chart's plotting area.
fn draw_no_data<C: plotters::coord::CoordTranslate>(
    plot: &DrawingArea<BitMapBackend<'_>, C>,
) -> DrawResult {
    let (w, h) = plot.dim_in_pixel();
    plot.strip_coord_spec().draw(&Text::new(
        "no data",
        (w as i32 / 2, h as i32 / 2),
        font(28.0)
            .color(&GREY)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    ))?;
    Ok(())
}

/// A chart's axes in data coordinates.
type Axes<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws `chart` onto `area` (with its title when `with_title`).
pub(crate) fn draw_chart(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    chart: &Chart,
    with_title: bool,
) -> DrawResult {
    let layers: Vec<Layer> = chart
        .layers
        .iter()
        .map(|l| Layer {
            points: finite_points(&l.points),
            ..l.clone()
        })
        .collect();
    let has_data = layers.iter().any(|l| !l.points.is_empty());
    let (x_range, y_range) = chart_ranges(chart, &layers);
    let clamp_y = |y: f64| y.clamp(y_range.0, y_range.1);

    let mut builder = ChartBuilder::on(area);
    builder
        .margin(12)
        .margin_right(24)
        .x_label_area_size(48)
        .y_label_area_size(72);
    if with_title {
        builder.caption(&chart.title, font(22.0));
    }
    let mut ctx = builder.build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)?;
    let x_fmt = tick_format(x_range.0, x_range.1);
    let y_fmt = tick_format(y_range.0, y_range.1);
    let mut mesh = ctx.configure_mesh();
    mesh.x_desc(&chart.x_label)
        .x_labels(8)
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt);
    style_mesh(&mut mesh, &chart.y_label).draw()?;

    let mut legend_entries = 0;
    for (label, y) in &chart.hlines {
        let y = clamp_y(*y);
        let style = ShapeStyle::from(&GREY).stroke_width(1);
        ctx.draw_series(DashedLineSeries::new(
            vec![(x_range.0, y), (x_range.1, y)],
            8,
            6,
            style,
        ))?
        .label(label.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        legend_entries += 1;
    }
    for layer in &layers {
        legend_entries += draw_layer(&mut ctx, layer, clamp_y)?;
    }

    if !has_data {
        draw_no_data(ctx.plotting_area())?;
    }
    if legend_entries > 0 {
        draw_legend(&mut ctx, legend_corner(&layers, x_range, y_range))?;
    }
    Ok(())
}

/// The x range of every point, and the y range the chart asks for or that fits its points and
/// reference lines.
fn chart_ranges(chart: &Chart, layers: &[Layer]) -> ((f64, f64), (f64, f64)) {
    let all_points = || layers.iter().flat_map(|l| l.points.iter());
    let x_range = padded_range(all_points().map(|p| p.0), 0.03).unwrap_or((0.0, 1.0));
    let y_range = match chart.y_range {
        Some((lo, hi)) if lo.is_finite() && hi.is_finite() && lo < hi => (lo, hi),
        Some((lo, hi)) if lo.is_finite() && hi.is_finite() => widen(lo.min(hi), lo.max(hi), 0.0),
        _ => padded_range(
            all_points()
                .map(|p| p.1)
                .chain(chart.hlines.iter().map(|h| h.1)),
            0.05,
        )
        .unwrap_or((0.0, 1.0)),
    };
    (x_range, y_range)
}

/// Draws one layer (its markers too when it is a short line); returns how many legend entries
/// it added.
fn draw_layer(
    ctx: &mut Axes<'_, '_>,
    layer: &Layer,
    clamp_y: impl Fn(f64) -> f64,
) -> DrawResult<usize> {
    let points: Vec<(f64, f64)> = layer.points.iter().map(|&(x, y)| (x, clamp_y(y))).collect();
    let colour = layer.colour;
    let style = match layer.kind {
        LayerKind::Line | LayerKind::Smooth => ShapeStyle::from(&colour).stroke_width(2),
        LayerKind::Raw => ShapeStyle::from(&colour.mix(0.35)).stroke_width(1),
    };
    let anno = ctx.draw_series(LineSeries::new(points.iter().copied(), style))?;
    let mut entries = 0;
    if let Some(label) = &layer.label {
        let text = if points.is_empty() {
            format!("{label} (no data)")
        } else {
            label.clone()
        };
        anno.label(text).legend(move |(x, y)| {
            PathElement::new(
                vec![(x, y), (x + 18, y)],
                ShapeStyle::from(&colour).stroke_width(2),
            )
        });
        entries += 1;
    }
    if layer.kind == LayerKind::Line && points.len() <= MARKER_MAX_POINTS {
        ctx.draw_series(
            points
                .iter()
                .map(|&p| Circle::new(p, 3, ShapeStyle::from(&colour).filled())),
        )?;
    }
    Ok(entries)
}

/// The mesh style every chart shares: the y description, fonts, 8 y labels, light grid lines.
fn style_mesh<'m, 'a, 'b, DB: DrawingBackend>(
    mesh: &'m mut MeshStyle<'a, 'b, RangedCoordf64, RangedCoordf64, DB>,
    y_label: &str,
) -> &'m mut MeshStyle<'a, 'b, RangedCoordf64, RangedCoordf64, DB> {
    mesh.y_desc(y_label)
        .axis_desc_style(font(16.0))
        .label_style(font(13.0))
        .y_labels(8)
        .max_light_lines(1)
        .light_line_style(RGBColor(243, 243, 243))
        .bold_line_style(RGBColor(215, 215, 215))
}

/// The legend box every chart shares, at `position`.
fn draw_legend<'a, 'b: 'a>(ctx: &mut Axes<'a, 'b>, position: SeriesLabelPosition) -> DrawResult {
    ctx.configure_series_labels()
        .position(position)
        .label_font(font(14.0))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(190, 190, 190))
        .margin(10)
        .draw()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bar charts.

#[derive(Debug, Clone)]
struct BarGroup {
    label: String,
    /// `(mean, std)`.
    bar: Option<(f64, f64)>,
    reference: Option<f64>,
}

const MAX_LABEL_LINES: usize = 4;

/// Splits `text` into lines no wider than `width` pixels (words are kept whole unless a word
/// alone is too wide), at most [`MAX_LABEL_LINES`] of them (the last one ends in "…" when the
/// text did not fit).
fn wrap_label(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    text: &str,
    style: &TextStyle<'_>,
    width: u32,
) -> DrawResult<Vec<String>> {
    let fits = |s: &str| -> DrawResult<bool> { Ok(area.estimate_text_size(s, style)?.0 <= width) };
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for word in text.split_whitespace() {
        let candidate = if current.is_empty() {
            word.to_string()
        } else {
            format!("{current} {word}")
        };
        if fits(&candidate)? {
            current = candidate;
            continue;
        }
        if !current.is_empty() {
            lines.push(std::mem::take(&mut current));
        }
        // A word too wide on its own is cut into pieces that fit.
        let mut piece = String::new();
        for c in word.chars() {
            let mut next = piece.clone();
            next.push(c);
            if !piece.is_empty() && !fits(&next)? {
                lines.push(std::mem::take(&mut piece));
                next = c.to_string();
            }
            piece = next;
        }
        current = piece;
    }
    if !current.is_empty() {
        lines.push(current);
    }
    if lines.len() > MAX_LABEL_LINES {
        lines.truncate(MAX_LABEL_LINES);
        let last = &mut lines[MAX_LABEL_LINES - 1];
        while !last.is_empty() && !fits(&format!("{last}…"))? {
            last.pop();
        }
        last.push('…');
    }
    Ok(lines)
}

fn draw_bars(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    title: &str,
    y_label: &str,
    groups: &[BarGroup],
    with_reference: bool,
) -> DrawResult {
    let n = groups.len().max(1);
    let (y_range, has_data) = bar_y_range(groups);
    let labels = GroupLabels::wrap(root, groups, n)?;

    let mut ctx = ChartBuilder::on(root)
        .caption(title, font(22.0))
        .margin(12)
        .margin_right(24)
        .x_label_area_size(labels.lines * labels.line_h + 14)
        .y_label_area_size(72)
        .build_cartesian_2d(-0.5..(n as f64 - 0.5), y_range.0..y_range.1)?;
    let y_fmt = tick_format(y_range.0, y_range.1);
    let mut mesh = ctx.configure_mesh();
    mesh.disable_x_mesh().x_labels(0).y_label_formatter(&y_fmt);
    style_mesh(&mut mesh, y_label).draw()?;

    let half = if with_reference { 0.19 } else { 0.3 };
    for (i, g) in groups.iter().enumerate() {
        let x = i as f64;
        let ours_x = if with_reference { x - half } else { x };
        draw_our_bar(&mut ctx, root, ours_x, half, g.bar)?;
        if let Some(r) = g.reference
            && r.is_finite()
        {
            draw_reference_bar(&mut ctx, root, x + half, half, r)?;
        }
        // The label, centred under the group.
        let (px, py) = ctx.backend_coord(&(x, y_range.0));
        for (k, line) in labels.wrapped[i].iter().enumerate() {
            root.draw(&Text::new(
                line.clone(),
                (px, py + 8 + k as i32 * labels.line_h as i32),
                TextStyle::from(font(13.0)).pos(Pos::new(HPos::Center, VPos::Top)),
            ))?;
        }
    }

    if !has_data {
        draw_no_data(ctx.plotting_area())?;
    }
    let (ours, theirs) = (palette(0), palette(1));
    ctx.draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
        .label("mean ± std")
        .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], ours.filled()));
    if with_reference {
        ctx.draw_series(std::iter::empty::<Rectangle<(f64, f64)>>())?
            .label("reference")
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], theirs.filled()));
    }
    draw_legend(&mut ctx, SeriesLabelPosition::UpperRight)
}

/// The y range of a bar chart — bar tops and bottoms (± std), references and 0, with head room
/// above for the value labels and the legend — and whether any value is finite.
fn bar_y_range(groups: &[BarGroup]) -> ((f64, f64), bool) {
    let mut values = vec![0.0];
    let mut has_data = false;
    for g in groups {
        if let Some((mean, std)) = g.bar
            && mean.is_finite()
        {
            has_data = true;
            values.push(mean);
            if std.is_finite() {
                values.push(mean + std.abs());
                values.push(mean - std.abs());
            }
        }
        if let Some(r) = g.reference
            && r.is_finite()
        {
            has_data = true;
            values.push(r);
        }
    }
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if hi - lo > 0.0 && (hi - lo).is_finite() {
        (lo, hi)
    } else {
        (0.0, 1.0)
    };
    let span = hi - lo;
    let y_range = (
        if lo < 0.0 { lo - 0.05 * span } else { lo },
        hi + 0.25 * span,
    );
    (y_range, has_data)
}

/// The groups' labels wrapped to the width of a group (estimated before the chart exists).
struct GroupLabels {
    wrapped: Vec<Vec<String>>,
    line_h: u32,
    lines: u32,
}

impl GroupLabels {
    fn wrap(
        root: &DrawingArea<BitMapBackend<'_>, Shift>,
        groups: &[BarGroup],
        n: usize,
    ) -> DrawResult<Self> {
        let label_style = TextStyle::from(font(13.0));
        let (width, _) = root.dim_in_pixel();
        let group_px = (width.saturating_sub(120)) / n as u32;
        let wrapped = groups
            .iter()
            .map(|g| wrap_label(root, &g.label, &label_style, group_px.saturating_sub(8)))
            .collect::<DrawResult<Vec<_>>>()?;
        let line_h = root.estimate_text_size("Ag", &label_style)?.1.max(13) + 3;
        let lines = wrapped.iter().map(Vec::len).max().unwrap_or(1).max(1) as u32;
        Ok(Self {
            wrapped,
            line_h,
            lines,
        })
    }
}

fn value_label_style() -> TextStyle<'static> {
    TextStyle::from(font(12.0)).pos(Pos::new(HPos::Center, VPos::Bottom))
}

/// Our bar at `x` (mean with a ± std error bar and its value above), "n/a" for a non-finite
/// mean, nothing for none.
fn draw_our_bar(
    ctx: &mut Axes<'_, '_>,
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    x: f64,
    half: f64,
    bar: Option<(f64, f64)>,
) -> DrawResult {
    match bar {
        Some((mean, std)) if mean.is_finite() => {
            let (b0, b1) = (mean.min(0.0), mean.max(0.0));
            ctx.draw_series(std::iter::once(Rectangle::new(
                [(x - half, b0), (x + half, b1)],
                palette(0).filled(),
            )))?;
            let mut top = mean;
            if std.is_finite() && std != 0.0 {
                let s = std.abs();
                top = mean + s;
                let cap = half * 0.45;
                let style = ShapeStyle::from(&BLACK).stroke_width(2);
                ctx.draw_series([
                    PathElement::new(vec![(x, mean - s), (x, mean + s)], style),
                    PathElement::new(vec![(x - cap, mean + s), (x + cap, mean + s)], style),
                    PathElement::new(vec![(x - cap, mean - s), (x + cap, mean - s)], style),
                ])?;
            }
            let (px, py) = ctx.backend_coord(&(x, top.max(0.0)));
            root.draw(&Text::new(
                format!("{mean:.3}"),
                (px, py - 3),
                value_label_style(),
            ))?;
        }
        Some(_) => {
            let (px, py) = ctx.backend_coord(&(x, 0.0));
            root.draw(&Text::new("n/a", (px, py - 3), value_label_style()))?;
        }
        None => {}
    }
    Ok(())
}

/// A reference bar at `x` with its value above.
fn draw_reference_bar(
    ctx: &mut Axes<'_, '_>,
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    x: f64,
    half: f64,
    value: f64,
) -> DrawResult {
    let (b0, b1) = (value.min(0.0), value.max(0.0));
    ctx.draw_series(std::iter::once(Rectangle::new(
        [(x - half, b0), (x + half, b1)],
        palette(1).filled(),
    )))?;
    let (px, py) = ctx.backend_coord(&(x, value.max(0.0)));
    root.draw(&Text::new(
        format!("{value:.3}"),
        (px, py - 3),
        value_label_style(),
    ))?;
    Ok(())
}
