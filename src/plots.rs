//! Pictures of a run: `metrics.png` (loss, accuracy and learning rate per epoch, best epoch
//! marked) and `confusion.png` (the confusion matrix as a heat map). Rendered in memory with an
//! embedded font, so no system font library is needed, then written atomically.

use std::path::Path;
use std::sync::Once;

use image::ImageEncoder;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::error::{Error, Result};
use crate::evaluate::Evaluation;
use crate::fs::write_atomic;
use crate::metrics::EpochRecord;

const FONT: &str = "sans-serif";
const TRAIN: RGBColor = RGBColor(31, 119, 180);
const TEST: RGBColor = RGBColor(214, 39, 40);
const BEST: RGBColor = RGBColor(44, 160, 44);

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded DejaVu Sans is a valid font; if it ever were not, text would be missing
        // from the pictures rather than the run failing.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
    });
}

/// Draws with `draw` onto a `width` x `height` canvas and writes it to `path` as PNG.
fn render(
    path: &Path,
    (width, height): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> std::result::Result<(), String>,
) -> Result<()> {
    register_font();
    let failed = |message: String| Error::Plot {
        path: path.to_path_buf(),
        message,
    };
    let mut pixels = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(e.to_string()))?;
        draw(&root).map_err(failed)?;
        root.present().map_err(|e| failed(e.to_string()))?;
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(&pixels, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| failed(e.to_string()))?;
    write_atomic(path, &png)
}

/// `metrics.png`: loss and accuracy (train and test) side by side, the learning rate below,
/// the best epoch marked in each.
pub fn metrics_png(path: &Path, records: &[EpochRecord], best_epoch: Option<usize>) -> Result<()> {
    render(path, (1200, 900), |root| {
        let (top, bottom) = root.split_vertically(620);
        let (left, right) = top.split_horizontally(600);
        let best = best_epoch.and_then(|e| records.iter().find(|r| r.epoch == e));
        let series = |r: &EpochRecord| (r.train_loss, r.test_loss);
        let best_loss = best.map(|b| (b.epoch, b.test_loss));
        panel(
            &left,
            "Loss",
            "cross-entropy",
            records,
            series,
            best_loss,
            SeriesLabelPosition::UpperRight,
        )?;
        let series = |r: &EpochRecord| (r.train_acc, r.test_acc);
        let best_acc = best.map(|b| (b.epoch, b.test_acc));
        panel(
            &right,
            "Accuracy",
            "accuracy",
            records,
            series,
            best_acc,
            SeriesLabelPosition::LowerRight,
        )?;
        lr_panel(&bottom, records, best.map(|b| b.epoch))
    })
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// Epochs are whole numbers: ticks between them stay unlabelled.
fn whole_epochs(x: &f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        String::new()
    }
}

/// One panel of two series (train, test) per epoch, with the best epoch's test value marked.
fn panel(
    area: &Area,
    title: &str,
    y_label: &str,
    records: &[EpochRecord],
    values: impl Fn(&EpochRecord) -> (f64, f64),
    best: Option<(usize, f64)>,
    legend_at: SeriesLabelPosition,
) -> std::result::Result<(), String> {
    let last_epoch = records.last().map_or(1, |r| r.epoch).max(2) as f64;
    let all: Vec<f64> = records
        .iter()
        .flat_map(|r| {
            let (a, b) = values(r);
            [a, b]
        })
        .filter(|v| v.is_finite())
        .collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.1).max(1e-3);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 26))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(1.0..last_epoch, (lo - pad)..(hi + pad))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&whole_epochs)
        .y_desc(y_label)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, color, pick) in [("train", TRAIN, 0), ("test", TEST, 1)] {
        let points: Vec<(f64, f64)> = records
            .iter()
            .map(|r| {
                let (a, b) = values(r);
                (r.epoch as f64, if pick == 0 { a } else { b })
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    if let Some((epoch, value)) = best {
        let x = epoch as f64;
        chart
            .draw_series(std::iter::once(PathElement::new(
                [(x, lo - pad), (x, hi + pad)],
                BEST.stroke_width(1),
            )))
            .map_err(|e| e.to_string())?
            .label(format!("best: epoch {epoch} ({value:.4})"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BEST.stroke_width(2)));
        chart
            .draw_series(std::iter::once(Circle::new(
                (x, value),
                8,
                BEST.stroke_width(3),
            )))
            .map_err(|e| e.to_string())?;
    }
    chart
        .configure_series_labels()
        .position(legend_at)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 16))
        .draw()
        .map_err(|e| e.to_string())
}

fn lr_panel(
    area: &Area,
    records: &[EpochRecord],
    best: Option<usize>,
) -> std::result::Result<(), String> {
    let last_epoch = records.last().map_or(1, |r| r.epoch).max(2) as f64;
    let top = records.iter().map(|r| r.lr).fold(0.0, f64::max).max(1e-12) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption("Learning rate", (FONT, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(1.0..last_epoch, 0.0..top)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_label_formatter(&whole_epochs)
        .y_desc("lr")
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .draw()
        .map_err(|e| e.to_string())?;
    let points = records.iter().map(|r| (r.epoch as f64, r.lr));
    chart
        .draw_series(LineSeries::new(points, BLACK.stroke_width(2)))
        .map_err(|e| e.to_string())?;
    if let Some(epoch) = best {
        let x = epoch as f64;
        chart
            .draw_series(std::iter::once(PathElement::new(
                [(x, 0.0), (x, top)],
                BEST.stroke_width(1),
            )))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Above this many classes the cells are too small for their counts: shading alone.
const MOST_COUNTS_SHOWN: usize = 20;

/// `confusion.png`: counts per (true, predicted) class, shaded by each true class's share;
/// `classes` names the rows and columns in label order.
pub fn confusion_png(
    path: &Path,
    eval: &Evaluation,
    classes: &[String],
    title: &str,
) -> Result<()> {
    let n = eval.confusion.len();
    // Rows run top to bottom in class order: row `truth` sits at y = n - 1 - truth.
    let class_at = |v: &SegmentValue<usize>, flip: bool| match v {
        SegmentValue::CenterOf(i) if *i < n => classes
            .get(if flip { n - 1 - i } else { *i })
            .cloned()
            .unwrap_or_default(),
        _ => String::new(),
    };
    render(path, (900, 860), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT, 24))
            .margin(20)
            .x_label_area_size(60)
            .y_label_area_size(110)
            .build_cartesian_2d((0..n).into_segmented(), (0..n).into_segmented())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(n)
            .y_labels(n)
            .x_desc("predicted")
            .y_desc("true class")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 18))
            .x_label_formatter(&|v| class_at(v, false))
            .y_label_formatter(&|v| class_at(v, true))
            .draw()
            .map_err(|e| e.to_string())?;
        for (truth, row) in eval.confusion.iter().enumerate() {
            let total = row.iter().sum::<u64>().max(1) as f64;
            let y = n - 1 - truth;
            for (predicted, &count) in row.iter().enumerate() {
                let share = count as f64 / total;
                let shade = (255.0 * (1.0 - share)) as u8;
                let cell = [
                    (SegmentValue::Exact(predicted), SegmentValue::Exact(y)),
                    (
                        SegmentValue::Exact(predicted + 1),
                        SegmentValue::Exact(y + 1),
                    ),
                ];
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        cell,
                        RGBColor(shade, shade, 255).filled(),
                    )))
                    .map_err(|e| e.to_string())?;
                if n > MOST_COUNTS_SHOWN {
                    continue;
                }
                let ink = if share > 0.5 { WHITE } else { BLACK };
                let style = (FONT, 17)
                    .into_font()
                    .color(&ink)
                    .pos(Pos::new(HPos::Center, VPos::Center));
                let centre = (SegmentValue::CenterOf(predicted), SegmentValue::CenterOf(y));
                chart
                    .plotting_area()
                    .draw(&Text::new(count.to_string(), centre, style))
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    })
}

/// A learning-rate range test's curve: the rate of each step, its loss as computed and smoothed,
/// and the suggested rate.
pub struct RangeTest<'a> {
    pub rates: &'a [f64],
    pub losses: &'a [f64],
    pub smoothed: &'a [f64],
    pub suggestion: Option<f64>,
}

/// `lr_find.png`: the range test's loss against the learning rate (log scale), each step's and
/// smoothed, the suggested rate marked.
pub fn lr_find_png(path: &Path, found: &RangeTest) -> Result<()> {
    render(path, (1000, 650), |root| {
        let points = |values: &[f64]| -> Vec<(f64, f64)> {
            found
                .rates
                .iter()
                .copied()
                .zip(values.iter().copied())
                .filter(|(_, v)| v.is_finite())
                .collect()
        };
        let (raw, smoothed) = (points(found.losses), points(found.smoothed));
        let first = found.rates.first().copied().unwrap_or(1e-7);
        let last = found.rates.last().copied().unwrap_or(1.0).max(first * 10.0);
        // The y range from the smoothed curve: the raw losses' spikes would flatten it.
        let lo = smoothed.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = smoothed
            .first()
            .map_or(1.0, |p| p.1)
            .max(lo + 1e-3)
            .min(lo * 4.0 + 1.0);
        let lo = if lo.is_finite() { lo } else { 0.0 };
        let pad = (hi - lo) * 0.15;
        let mut chart = ChartBuilder::on(root)
            .caption("Learning-rate range test", (FONT, 26))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d((first..last).log_scale(), (lo - pad)..(hi + pad))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("learning rate")
            .y_desc("training loss")
            .x_label_formatter(&|x| format!("{x:.0e}"))
            .label_style((FONT, 16))
            .axis_desc_style((FONT, 18))
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(LineSeries::new(raw, TRAIN.mix(0.35)))
            .map_err(|e| e.to_string())?
            .label("loss")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], TRAIN.mix(0.35)));
        chart
            .draw_series(LineSeries::new(smoothed, TRAIN.stroke_width(3)))
            .map_err(|e| e.to_string())?
            .label("smoothed")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], TRAIN.stroke_width(3)));
        if let Some(rate) = found.suggestion {
            chart
                .draw_series(LineSeries::new(
                    [(rate, lo - pad), (rate, hi + pad)],
                    BEST.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(format!("suggested {rate:.2e}"))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BEST.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FONT, 16))
            .draw()
            .map_err(|e| e.to_string())
    })
}
