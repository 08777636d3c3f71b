//! PNG plots of routing results (plotters, bitmap backend): a heatmap of per-question routing
//! decisions, accuracy against mean block passes, and a per-block estimate with its interval
//! (e.g. the AUC of each block's skip decision).
//!
//! Text needs a TrueType font, loaded once from the system: `DRLLM_FONT` if set, else DejaVu
//! Sans (Debian/Ubuntu package `fonts-dejavu-core`) or another common sans-serif font from the
//! usual locations ([`FONT_CANDIDATES`]). No font is bundled.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Font files tried in order when `DRLLM_FONT` is not set.
pub const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/DejaVuSans.ttf",
    "/usr/local/share/fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Above this many questions, [`decision_heatmap`] draws per-block shares instead of cells.
pub const MAX_HEATMAP_QUESTIONS: usize = 400;

/// Errors of this module.
#[derive(Debug)]
#[non_exhaustive]
pub enum PlotError {
    /// No usable font was found.
    Font {
        /// What was tried.
        message: String,
    },
    /// The input cannot be plotted.
    Input {
        /// What is wrong.
        message: String,
    },
    /// Drawing or writing the image failed.
    Draw {
        /// The image.
        path: PathBuf,
        /// What happened.
        message: String,
    },
}

impl fmt::Display for PlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlotError::Font { message } => write!(f, "no font for plots: {message}"),
            PlotError::Input { message } => write!(f, "cannot plot: {message}"),
            PlotError::Draw { path, message } => write!(f, "{}: {message}", path.display()),
        }
    }
}

impl std::error::Error for PlotError {}

static FONT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Loads and registers the plot font once per process (see the module docs); returns the file
/// it came from.
pub fn ensure_font() -> Result<PathBuf, PlotError> {
    FONT.get_or_init(load_font)
        .clone()
        .map_err(|message| PlotError::Font { message })
}

fn load_font() -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    let env = std::env::var_os("DRLLM_FONT").map(PathBuf::from);
    let candidates: Vec<PathBuf> = match env {
        Some(p) => vec![p],
        None => FONT_CANDIDATES.iter().map(PathBuf::from).collect(),
    };
    for path in candidates {
        let Ok(bytes) = std::fs::read(&path) else {
            tried.push(path.display().to_string());
            continue;
        };
        // registered fonts live for the whole process: leak one copy, once
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_err() {
            return Err(format!("{} is not a usable TrueType font", path.display()));
        }
        return Ok(path);
    }
    Err(format!(
        "none of {} exists; install the Debian package fonts-dejavu-core \
         (apt-get install fonts-dejavu-core) or set DRLLM_FONT to a .ttf file",
        tried.join(", ")
    ))
}

/// Colour of skip decisions.
const SKIP: RGBColor = RGBColor(230, 97, 1);
/// Colour of execute decisions.
const EXECUTE: RGBColor = RGBColor(215, 215, 215);
/// Colour of repeat decisions.
const REPEAT: RGBColor = RGBColor(94, 60, 153);
const CLASS_COLOURS: [RGBColor; 3] = [SKIP, EXECUTE, REPEAT];
const CLASS_NAMES: [&str; 3] = ["skip", "execute", "repeat"];

fn draw_err<E: std::error::Error + Send + Sync>(
    path: &Path,
) -> impl Fn(DrawingAreaErrorKind<E>) -> PlotError + '_ {
    move |e| PlotError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Checks the output path (a `.png` file) and gives the temporary file drawn first.
fn png_tmp(path: &Path) -> Result<PathBuf, PlotError> {
    let is_png = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        return Err(PlotError::Input {
            message: format!("{} must end in .png", path.display()),
        });
    }
    Ok(path.with_extension("tmp.png"))
}

fn finish(tmp: &Path, path: &Path, result: Result<(), PlotError>) -> Result<(), PlotError> {
    let result = result.and_then(|()| {
        std::fs::rename(tmp, path).map_err(|e| PlotError::Draw {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Label formatter for integer positions on an `f64` axis (blank between integers).
fn integer_label(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-6 {
        format!("{}", v.round() as i64)
    } else {
        String::new()
    }
}

/// Heatmap of routing decisions: one row per block (block 0 at the bottom), one column per
/// question, coloured skip / execute / repeat; with more than [`MAX_HEATMAP_QUESTIONS`]
/// questions, stacked bars of each block's share of skip / execute / repeat instead. A legend
/// on the right gives the overall shares. `decisions[q][b]` is the pass count (0, 1 or 2) of
/// block `b` for question `q`; every question must have the same number of blocks.
pub fn decision_heatmap(path: &Path, title: &str, decisions: &[Vec<u8>]) -> Result<(), PlotError> {
    decision_heatmap_of(path, title, decisions, "question")
}

/// [`decision_heatmap`] whose columns are called `item` (e.g. "request") in the labels.
pub fn decision_heatmap_of(
    path: &Path,
    title: &str,
    decisions: &[Vec<u8>],
    item: &str,
) -> Result<(), PlotError> {
    let n_q = decisions.len();
    let n_b = decisions.first().map_or(0, Vec::len);
    if n_q == 0 || n_b == 0 {
        return Err(PlotError::Input {
            message: "no decisions to plot".into(),
        });
    }
    for (q, row) in decisions.iter().enumerate() {
        if row.len() != n_b {
            return Err(PlotError::Input {
                message: format!(
                    "question {q} has {} blocks, question 0 has {n_b}",
                    row.len()
                ),
            });
        }
        if let Some(&d) = row.iter().find(|&&d| d > 2) {
            return Err(PlotError::Input {
                message: format!("question {q} has decision {d} (must be 0, 1 or 2)"),
            });
        }
    }
    ensure_font()?;
    let tmp = png_tmp(path)?;
    let result = draw_heatmap(&tmp, title, decisions, n_b, item);
    finish(&tmp, path, result)
}

fn draw_heatmap(
    tmp: &Path,
    title: &str,
    decisions: &[Vec<u8>],
    n_b: usize,
    item: &str,
) -> Result<(), PlotError> {
    let n_q = decisions.len();
    let err = draw_err(tmp);
    let root = BitMapBackend::new(tmp, (1400, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let (main, side) = root.split_horizontally(1200);

    // counts[b][class]
    let mut counts = vec![[0usize; 3]; n_b];
    for row in decisions {
        for (b, &d) in row.iter().enumerate() {
            counts[b][usize::from(d)] += 1;
        }
    }

    let bars = n_q > MAX_HEATMAP_QUESTIONS;
    let caption = if bars {
        format!("{title} ({n_q} {item}s)")
    } else {
        title.to_string()
    };
    let mut builder = ChartBuilder::on(&main);
    builder
        .caption(caption, ("sans-serif", 28))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(60);
    if bars {
        draw_shares(&mut builder, &counts, n_q, item).map_err(&err)?;
    } else {
        draw_cells(&mut builder, decisions, n_b, item).map_err(&err)?;
    }

    let total: [usize; 3] = counts.iter().fold([0; 3], |mut acc, c| {
        for k in 0..3 {
            acc[k] += c[k];
        }
        acc
    });
    let all = (n_q * n_b) as f64;
    let entries: Vec<(RGBColor, String)> = (0..3)
        .map(|k| {
            (
                CLASS_COLOURS[k],
                format!("{} {:.1}%", CLASS_NAMES[k], 100.0 * total[k] as f64 / all),
            )
        })
        .collect();
    let mean_passes = (total[1] + 2 * total[2]) as f64 / n_q as f64;
    draw_legend(
        &side,
        &entries,
        &[
            format!("{n_q} {item}s"),
            format!("{n_b} blocks"),
            format!("{mean_passes:.2} passes"),
            format!("per {item}"),
        ],
    )
    .map_err(&err)?;
    root.present().map_err(&err)?;
    Ok(())
}

type DrawResult =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

/// Per block, the shares of the decisions over all `n_q` questions as stacked bars.
fn draw_shares(
    builder: &mut ChartBuilder<'_, '_, BitMapBackend<'_>>,
    counts: &[[usize; 3]],
    n_q: usize,
    item: &str,
) -> DrawResult {
    let n_b = counts.len();
    let mut chart = builder.build_cartesian_2d(-0.5f64..n_b as f64 - 0.5, 0f64..100f64)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n_b.min(40))
        .x_label_formatter(&integer_label)
        .x_desc("block")
        .y_desc(format!("share of {item}s (%)"))
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 15))
        .draw()?;
    let n = n_q as f64;
    let mut rects = Vec::new();
    for (b, c) in counts.iter().enumerate() {
        let x = b as f64;
        let mut low = 0.0;
        for class in 0..3 {
            let high = low + 100.0 * c[class] as f64 / n;
            if high > low {
                rects.push(Rectangle::new(
                    [(x - 0.4, low), (x + 0.4, high)],
                    CLASS_COLOURS[class].filled(),
                ));
            }
            low = high;
        }
    }
    chart.draw_series(rects)?;
    Ok(())
}

/// One cell per question and block, coloured by the decision.
fn draw_cells(
    builder: &mut ChartBuilder<'_, '_, BitMapBackend<'_>>,
    decisions: &[Vec<u8>],
    n_b: usize,
    item: &str,
) -> DrawResult {
    let n_q = decisions.len();
    let mut chart =
        builder.build_cartesian_2d(-0.5f64..n_q as f64 - 0.5, -0.5f64..n_b as f64 - 0.5)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(n_q.min(20))
        .y_labels(n_b.min(40))
        .x_label_formatter(&integer_label)
        .y_label_formatter(&integer_label)
        .x_desc(item)
        .y_desc("block")
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 15))
        .draw()?;
    let cells = decisions.iter().enumerate().flat_map(|(q, row)| {
        row.iter().enumerate().map(move |(b, &d)| {
            let (x, y) = (q as f64, b as f64);
            Rectangle::new(
                [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                CLASS_COLOURS[usize::from(d)].filled(),
            )
        })
    });
    chart.draw_series(cells)?;
    Ok(())
}

fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[(RGBColor, String)],
    notes: &[String],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let style = ("sans-serif", 18).into_font().color(&BLACK);
    let mut y = 90;
    for (colour, text) in entries {
        area.draw(&Rectangle::new([(10, y), (30, y + 20)], colour.filled()))?;
        area.draw(&Rectangle::new(
            [(10, y), (30, y + 20)],
            BLACK.stroke_width(1),
        ))?;
        area.draw_text(text, &style, (38, y + 1))?;
        y += 32;
    }
    y += 16;
    for note in notes {
        area.draw_text(note, &style, (10, y))?;
        y += 26;
    }
    Ok(())
}

/// One configuration in [`accuracy_vs_passes`].
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// Its name, written next to the point (`"plain"`, `"routed bias +1"`, `"static skip 13"`).
    pub label: String,
    /// Mean block passes per question.
    pub passes: f64,
    /// Accuracy in percent.
    pub accuracy: f64,
    /// Standard error of the accuracy in percent (0: no error bar).
    pub stderr: f64,
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

/// Accuracy (%) against mean block passes per question: one labelled point per configuration,
/// with a ±1 standard error bar where `stderr > 0`. All values must be finite, `stderr >= 0`.
pub fn accuracy_vs_passes(path: &Path, title: &str, points: &[Point]) -> Result<(), PlotError> {
    if points.is_empty() {
        return Err(PlotError::Input {
            message: "no points to plot".into(),
        });
    }
    for p in points {
        if !(p.passes.is_finite() && p.accuracy.is_finite() && p.stderr.is_finite())
            || p.stderr < 0.0
        {
            return Err(PlotError::Input {
                message: format!(
                    "point {:?} has a non-finite value or negative stderr",
                    p.label
                ),
            });
        }
    }
    ensure_font()?;
    let tmp = png_tmp(path)?;
    let result = draw_accuracy(&tmp, title, points);
    finish(&tmp, path, result)
}

/// One block in [`block_intervals`]: an estimate with its interval, or None (not defined).
#[derive(Clone, Debug, PartialEq)]
pub struct BlockEstimate {
    pub block: usize,
    /// (estimate, low, high), all finite with low <= estimate <= high.
    pub value: Option<(f64, f64, f64)>,
}

/// A per-block estimate with its interval (a point and a whisker per block), and a dashed
/// horizontal reference line (e.g. AUC 0.5) on a y axis from `y_range.0` to `y_range.1`.
pub fn block_intervals(
    path: &Path,
    title: &str,
    y_desc: &str,
    rows: &[BlockEstimate],
    reference: f64,
    y_range: (f64, f64),
) -> Result<(), PlotError> {
    if rows.is_empty() {
        return Err(PlotError::Input {
            message: "no blocks to plot".into(),
        });
    }
    for r in rows {
        if let Some((e, lo, hi)) = r.value {
            if !(e.is_finite() && lo.is_finite() && hi.is_finite() && lo <= e && e <= hi) {
                return Err(PlotError::Input {
                    message: format!("block {}: bad interval {lo} <= {e} <= {hi}", r.block),
                });
            }
        }
    }
    if !(y_range.0 < y_range.1 && reference.is_finite()) {
        return Err(PlotError::Input {
            message: format!("bad y range {y_range:?}"),
        });
    }
    ensure_font()?;
    let tmp = png_tmp(path)?;
    let result = draw_intervals(&tmp, title, y_desc, rows, reference, y_range);
    finish(&tmp, path, result)
}

fn draw_intervals(
    tmp: &Path,
    title: &str,
    y_desc: &str,
    rows: &[BlockEstimate],
    reference: f64,
    y_range: (f64, f64),
) -> Result<(), PlotError> {
    let err = draw_err(tmp);
    let n = rows.iter().map(|r| r.block).max().unwrap_or(0) as f64 + 1.0;
    let root = BitMapBackend::new(tmp, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..n - 0.5, y_range.0..y_range.1)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("block")
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .y_desc(y_desc)
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(&err)?;
    let grey = RGBColor(120, 120, 120);
    chart
        .draw_series(DashedLineSeries::new(
            vec![(-0.5, reference), (n - 0.5, reference)],
            8,
            5,
            grey.stroke_width(2),
        ))
        .map_err(&err)?;
    let colour = PALETTE[0];
    for r in rows {
        let Some((e, lo, hi)) = r.value else { continue };
        let x = r.block as f64;
        let clamp = |v: f64| v.clamp(y_range.0, y_range.1);
        let style = colour.stroke_width(2);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, clamp(lo)), (x, clamp(hi))],
                style,
            )))
            .map_err(&err)?;
        let cap = |y: f64| {
            EmptyElement::at((x, clamp(y))) + PathElement::new(vec![(-5, 0), (5, 0)], style)
        };
        chart.draw_series([cap(lo), cap(hi)]).map_err(&err)?;
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((x, clamp(e))) + Circle::new((0, 0), 5, colour.filled()),
            ))
            .map_err(&err)?;
    }
    root.present().map_err(&err)?;
    Ok(())
}

/// A range around `lo..hi` with some padding (at least `min_pad`).
fn padded(lo: f64, hi: f64, frac: f64, min_pad: f64) -> (f64, f64) {
    let pad = ((hi - lo) * frac).max(min_pad);
    (lo - pad, hi + pad)
}

fn draw_accuracy(tmp: &Path, title: &str, points: &[Point]) -> Result<(), PlotError> {
    let err = draw_err(tmp);
    let fold = |f: fn(f64, f64) -> f64, init: f64, g: &dyn Fn(&Point) -> f64| {
        points.iter().map(g).fold(init, f)
    };
    let x_lo = fold(f64::min, f64::INFINITY, &|p| p.passes);
    let x_hi = fold(f64::max, f64::NEG_INFINITY, &|p| p.passes);
    let y_lo = fold(f64::min, f64::INFINITY, &|p| p.accuracy - p.stderr);
    let y_hi = fold(f64::max, f64::NEG_INFINITY, &|p| p.accuracy + p.stderr);
    let (x_lo, x_hi) = padded(x_lo, x_hi, 0.12, 0.5);
    let (y_lo, y_hi) = padded(y_lo, y_hi, 0.12, 1.0);

    let root = BitMapBackend::new(tmp, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 28))
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(70)
        .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_desc("mean block passes per question")
        .y_desc("accuracy (%)")
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(&err)?;
    for (i, p) in points.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        if p.stderr > 0.0 {
            let (lo, hi) = (p.accuracy - p.stderr, p.accuracy + p.stderr);
            let style = colour.stroke_width(2);
            let cap = |y: f64| {
                EmptyElement::at((p.passes, y)) + PathElement::new(vec![(-7, 0), (7, 0)], style)
            };
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(p.passes, lo), (p.passes, hi)],
                    style,
                )))
                .map_err(&err)?;
            chart.draw_series([cap(lo), cap(hi)]).map_err(&err)?;
        }
        let label = p.label.clone();
        let text_style = ("sans-serif", 17).into_font().color(&colour);
        chart
            .draw_series(std::iter::once(
                EmptyElement::at((p.passes, p.accuracy))
                    + Circle::new((0, 0), 6, colour.filled())
                    + Text::new(label, (10, -20), text_style),
            ))
            .map_err(&err)?;
    }
    root.present().map_err(&err)?;
    Ok(())
}
