//! SVG charts of a report: one panel per metric, each a horizontal grouped bar chart (one
//! group per case, one bar per variant that has a value), the scenario as the title and a
//! legend with fixed colours per variant. Text is laid out by plotters' built-in estimate
//! (no font files are read), so the SVG renders with whatever sans-serif font the viewer has.

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::prelude::*;

use crate::mesh::Variant;
use crate::report::Row;

/// Width of one panel in pixels.
const PANEL_W: u32 = 620;
/// Panels side by side.
const COLUMNS: usize = 2;
/// Height of one bar, and the gap between two cases.
const BAR_H: u32 = 14;
const GROUP_GAP: u32 = 14;
/// Height of the title and of the legend strip.
const TITLE_H: u32 = 40;
const LEGEND_H: u32 = 30;
const FONT: &str = "sans-serif";

/// The fixed colour of each variant.
fn colour(v: Variant) -> RGBColor {
    match v {
        Variant::Direct => RGBColor(0x88, 0x88, 0x88),
        Variant::Ferry => RGBColor(0x1f, 0x77, 0xb4),
        Variant::Envoy => RGBColor(0xff, 0x7f, 0x0e),
    }
}

/// The unit a metric's name ends in, spelt out for the axis.
fn unit(metric: &str) -> Option<&'static str> {
    const SUFFIXES: [(&str, &str); 12] = [
        ("gbit_per_s", "Gbit/s"),
        ("_s_per_gb", "s/GB"),
        ("_us_per_request", "µs/request"),
        ("_us_per_connection", "µs/connection"),
        ("_per_s", "1/s"),
        ("_us", "µs"),
        ("_ms", "ms"),
        ("_s", "s"),
        ("_mib", "MiB"),
        ("_kib", "KiB"),
        ("_util", "cores"),
        ("kib_per_idle_connection", "KiB"),
    ];
    SUFFIXES
        .iter()
        .find(|(s, _)| metric.ends_with(s))
        .map(|(_, u)| *u)
}

/// The value axis' label: the metric, its unit and which way is better.
pub fn axis_label(metric: &str, higher_is_better: bool) -> String {
    let arrow = if higher_is_better {
        "↑ higher is better"
    } else {
        "↓ lower is better"
    };
    match unit(metric) {
        Some(u) => format!("{metric} [{u}] {arrow}"),
        None => format!("{metric} {arrow}"),
    }
}

/// A bar's value label.
fn fmt(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// The case axis: `n` cases over `0..n`, case `i` (from the top) in `[n-1-i, n-i]`, one
/// label at the centre of each.
struct Cases(usize);

impl Ranged for Cases {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let f = value / self.0.max(1) as f64;
        limit.0 + (f * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, _hint: Hint) -> Vec<f64> {
        (0..self.0).map(|i| i as f64 + 0.5).collect()
    }

    fn range(&self) -> std::ops::Range<f64> {
        0.0..self.0 as f64
    }
}

/// One panel: a metric and, per case that has any value for it, the variants' values.
struct Panel<'a> {
    metric: &'static str,
    higher_is_better: bool,
    cases: Vec<(&'a str, Vec<(Variant, f64)>)>,
}

fn panels<'a>(rows: &[Row<'a>]) -> Vec<Panel<'a>> {
    let mut out: Vec<Panel<'_>> = Vec::new();
    for r in rows {
        let bars: Vec<(Variant, f64)> = Variant::ALL
            .iter()
            .zip(r.values)
            .filter_map(|(v, x)| Some((*v, x?)))
            .filter(|(_, x)| x.is_finite())
            .collect();
        if bars.is_empty() {
            continue;
        }
        match out.iter_mut().find(|p| p.metric == r.metric) {
            Some(p) => p.cases.push((r.case, bars)),
            None => out.push(Panel {
                metric: r.metric,
                higher_is_better: r.higher_is_better,
                cases: vec![(r.case, bars)],
            }),
        }
    }
    out
}

fn panel_height(p: &Panel<'_>, bars_per_case: usize) -> u32 {
    let n = p.cases.len() as u32;
    90 + n * (bars_per_case as u32 * BAR_H + GROUP_GAP)
}

/// Renders `rows` (a report's means) as an SVG document titled `scenario`.
pub fn render(scenario: &str, rows: &[Row<'_>]) -> anyhow::Result<String> {
    let panels = panels(rows);
    let present: Vec<Variant> = Variant::ALL
        .into_iter()
        .filter(|v| {
            panels
                .iter()
                .any(|p| p.cases.iter().any(|(_, b)| b.iter().any(|(w, _)| w == v)))
        })
        .collect();
    let per_case = present.len().max(1);
    let longest = rows
        .iter()
        .map(|r| r.case.chars().count())
        .max()
        .unwrap_or(4);
    let label_w = (longest as u32 * 7 + 12).clamp(60, 260);
    // Rows of panels, each as tall as its tallest panel.
    let grid: Vec<&[Panel<'_>]> = panels.chunks(COLUMNS).collect();
    let heights: Vec<u32> = grid
        .iter()
        .map(|row| {
            row.iter()
                .map(|p| panel_height(p, per_case))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let width = PANEL_W * panels.len().clamp(1, COLUMNS) as u32;
    let height = TITLE_H + LEGEND_H + heights.iter().sum::<u32>().max(60);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let root = root.titled(scenario, (FONT, 24)).map_err(plot_err)?;
        let (legend, mut body) = root.split_vertically(LEGEND_H);
        let mut x = 10;
        for v in &present {
            legend
                .draw(&Rectangle::new([(x, 8), (x + 14, 22)], colour(*v).filled()))
                .map_err(plot_err)?;
            legend
                .draw(&Text::new(v.name(), (x + 20, 8), (FONT, 14)))
                .map_err(plot_err)?;
            x += 30 + 9 * v.name().len() as i32;
        }
        if panels.is_empty() {
            body.draw(&Text::new("no values recorded", (10, 10), (FONT, 14)))
                .map_err(plot_err)?;
        }
        for (row, h) in grid.iter().zip(&heights) {
            let (this, rest) = body.split_vertically(*h);
            body = rest;
            let cells = this.split_evenly((1, COLUMNS));
            for (p, cell) in row.iter().zip(cells.iter()) {
                draw_panel(cell, p, &present, label_w)?;
            }
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn plot_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    p: &Panel<'_>,
    present: &[Variant],
    label_w: u32,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let n = p.cases.len();
    let values = p.cases.iter().flat_map(|(_, b)| b.iter().map(|(_, x)| *x));
    let (lo, hi) = values.fold((0.0f64, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let span = if hi - lo > 0.0 { hi - lo } else { 1.0 };
    // Room past the longest bar for its value label.
    let (lo, hi) = (
        if lo < 0.0 { lo - 0.2 * span } else { 0.0 },
        hi + 0.2 * span,
    );
    let names: Vec<&str> = p.cases.iter().map(|(c, _)| *c).collect();
    let case_at = |y: &f64| -> String {
        let i = n as f64 - 1.0 - y.floor();
        if i >= 0.0 && (i as usize) < n {
            names[i as usize].to_owned()
        } else {
            String::new()
        }
    };
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(label_w)
        .build_cartesian_2d(lo..hi, Cases(n))
        .map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&case_at)
        .x_labels(6)
        .x_label_formatter(&|x| fmt(*x))
        .x_desc(axis_label(p.metric, p.higher_is_better))
        .axis_desc_style((FONT, 14))
        .label_style((FONT, 12))
        .draw()
        .map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
    let slot = 1.0 / (present.len() as f64 + 1.0);
    for (i, (_, bars)) in p.cases.iter().enumerate() {
        let top = (n - 1 - i) as f64 + 1.0 - slot / 2.0;
        for (v, x) in bars {
            let j = present.iter().position(|w| w == v).unwrap_or(0) as f64;
            let (y0, y1) = (top - j * slot, top - (j + 1.0) * slot);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.0, y0), (*x, y1)],
                    colour(*v).filled(),
                )))
                .map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    fmt(*x),
                    (x.max(0.0) + 0.01 * span, y0),
                    (FONT, 11),
                )))
                .map_err(|e| anyhow::anyhow!("drawing the chart: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::mesh::Variant;
    use crate::report::Report;

    #[test]
    fn a_small_report_renders_to_svg_with_its_title_and_cases() {
        let mut r = Report::new("throughput");
        for (case, f) in [("IstioMtls-1conn", 12.0), ("Mtls-8conn", 20.0)] {
            r.record(case, "gbit_per_s", true, Variant::Direct, 30.0);
            r.record(case, "gbit_per_s", true, Variant::Ferry, f);
            r.record(case, "gbit_per_s", true, Variant::Envoy, 8.0);
            r.record(case, "proxy_cpu_s_per_gb", false, Variant::Ferry, 0.4);
        }
        r.record("idle", "rss_mib", false, Variant::Ferry, 9.5);
        let svg = r.svg().expect("render");
        assert!(svg.contains("<svg"), "{svg}");
        for text in [
            "throughput",
            "IstioMtls-1conn",
            "Mtls-8conn",
            "idle",
            "gbit_per_s [Gbit/s] ↑",
            "envoy",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
    }

    #[test]
    fn an_empty_report_still_renders() {
        let svg = Report::new("xds").svg().expect("render");
        assert!(svg.contains("<svg") && svg.contains("xds"));
    }
}
