//! Plain SVG line and bar charts, written as text (no plotting library):
//! a title, axes from zero with round ticks, axis labels, a legend on the
//! right and a caption line under the plot.

use std::fmt::Write;

/// Colours for series, in order (Okabe-Ito: tell-apart for colour-blind
/// readers too).
const PALETTE: &[&str] = &[
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000",
];
const LEFT: f64 = 80.0;
const TOP: f64 = 56.0;
/// Roughly the width of one character at the 12 px font (legend and
/// category labels are sized with it; nothing needs it exact).
const CHAR_WIDTH: f64 = 7.0;
/// The narrowest plot area: room for a title and an axis label under it.
const MIN_PLOT_WIDTH: f64 = 480.0;
/// The caption's font is 11 px.
const CAPTION_CHAR_WIDTH: f64 = 6.5;
const BOTTOM: f64 = 92.0;
const PLOT_HEIGHT: f64 = 300.0;

/// One line of a [`LineChart`]: (x, y) points, drawn in x order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A line chart with numeric x and y axes, both starting at zero.
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub caption: String,
    pub series: Vec<Series>,
}

/// One colour of a [`BarChart`]: a value (or none) per category.
#[derive(Debug, Clone, PartialEq)]
pub struct BarSeries {
    pub label: String,
    pub values: Vec<Option<f64>>,
}

/// Grouped bars: one group per category, one bar per series.
#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub caption: String,
    pub categories: Vec<String>,
    pub series: Vec<BarSeries>,
}

/// Escapes text for SVG element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Round tick values from 0 to at least `max` (1, 2 or 5 times a power of
/// ten apart, about five of them).
pub fn ticks(max: f64) -> Vec<f64> {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let rough = max / 5.0;
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * power);
    let count = (max / step).ceil() as usize;
    (0..=count).map(|i| i as f64 * step).collect()
}

/// A tick label: whole numbers plainly (with k/M past 10 000), fractions
/// with as many digits as the step needs.
pub fn tick_label(value: f64, step: f64) -> String {
    if value == 0.0 {
        return "0".to_string();
    }
    if value.abs() >= 10_000.0 && step >= 1000.0 {
        if value.abs() >= 10_000_000.0 && step >= 1_000_000.0 {
            return format!("{}M", trim_float(value / 1e6, step / 1e6));
        }
        return format!("{}k", trim_float(value / 1e3, step / 1e3));
    }
    trim_float(value, step)
}

fn trim_float(value: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil().max(0.0) as usize
    };
    format!("{value:.decimals$}")
}

/// The frame all charts share: background, title, y axis with grid lines,
/// axis labels, caption; returns the SVG so far and the y scale.
struct Frame {
    svg: String,
    plot_width: f64,
    y_max: f64,
}

impl Frame {
    fn new(
        title: &str,
        y_label: &str,
        caption: &str,
        plot_width: f64,
        y_data_max: f64,
        legend: &[&str],
    ) -> Frame {
        let longest = legend.iter().map(|l| l.chars().count()).max().unwrap_or(0);
        let width = (LEFT + plot_width + 60.0 + CHAR_WIDTH * longest as f64)
            .max(LEFT + CAPTION_CHAR_WIDTH * caption.chars().count() as f64 + 20.0);
        let legend_height = TOP + 20.0 * legend.len() as f64 + 20.0;
        let height = (TOP + PLOT_HEIGHT + BOTTOM).max(legend_height);
        let y_ticks = ticks(y_data_max);
        let y_max = *y_ticks.last().unwrap_or(&1.0);
        let step = y_ticks.get(1).copied().unwrap_or(y_max);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(
            svg,
            r#"<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="white"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="28" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
            LEFT + plot_width / 2.0,
            escape(title)
        );
        let bottom = TOP + PLOT_HEIGHT;
        for tick in &y_ticks {
            let y = bottom - tick / y_max * PLOT_HEIGHT;
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#dddddd"/>"##,
                LEFT + plot_width
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT - 6.0,
                y + 4.0,
                tick_label(*tick, step)
            );
        }
        let _ = writeln!(
            svg,
            r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="black"/>"#
        );
        let _ = writeln!(
            svg,
            r#"<line x1="{LEFT}" y1="{bottom}" x2="{:.1}" y2="{bottom}" stroke="black"/>"#,
            LEFT + plot_width
        );
        let mid = TOP + PLOT_HEIGHT / 2.0;
        let _ = writeln!(
            svg,
            r#"<text x="20" y="{mid:.1}" text-anchor="middle" transform="rotate(-90 20 {mid:.1})">{}</text>"#,
            escape(y_label)
        );
        Frame {
            svg,
            plot_width,
            y_max,
        }
    }

    fn y(&self, value: f64) -> f64 {
        TOP + PLOT_HEIGHT - value / self.y_max * PLOT_HEIGHT
    }

    fn legend(&mut self, index: usize, label: &str, mark: &str) {
        let x = LEFT + self.plot_width + 20.0;
        let y = TOP + 20.0 * index as f64;
        let colour = colour(index);
        let _ = match mark {
            "line" => writeln!(
                self.svg,
                r#"<line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}" stroke-width="2"/><circle cx="{:.1}" cy="{y:.1}" r="3" fill="{colour}"/>"#,
                x + 24.0,
                x + 12.0
            ),
            _ => writeln!(
                self.svg,
                r#"<rect x="{:.1}" y="{:.1}" width="16" height="10" fill="{colour}"/>"#,
                x + 4.0,
                y - 5.0
            ),
        };
        let _ = writeln!(
            self.svg,
            r#"<text x="{:.1}" y="{:.1}">{}</text>"#,
            x + 32.0,
            y + 4.0,
            escape(label)
        );
    }

    fn finish(mut self, x_label: &str, caption: &str) -> String {
        let centre = LEFT + self.plot_width / 2.0;
        let bottom = TOP + PLOT_HEIGHT;
        let _ = writeln!(
            self.svg,
            r#"<text x="{centre:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            bottom + 54.0,
            escape(x_label)
        );
        let _ = writeln!(
            self.svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="11" fill="#555555">{}</text>"##,
            LEFT,
            bottom + 80.0,
            escape(caption)
        );
        self.svg.push_str("</svg>\n");
        self.svg
    }
}

fn colour(index: usize) -> &'static str {
    PALETTE[index % PALETTE.len()]
}

impl LineChart {
    /// The chart as an SVG document.
    pub fn to_svg(&self) -> String {
        let points = self.series.iter().flat_map(|s| s.points.iter());
        let x_data_max = points.clone().map(|p| p.0).fold(0.0, f64::max);
        let y_data_max = points.map(|p| p.1).fold(0.0, f64::max);
        let plot_width = MIN_PLOT_WIDTH;
        let legend: Vec<&str> = self.series.iter().map(|s| s.label.as_str()).collect();
        let mut frame = Frame::new(
            &self.title,
            &self.y_label,
            &self.caption,
            plot_width,
            y_data_max,
            &legend,
        );
        let x_ticks = ticks(x_data_max);
        let x_max = *x_ticks.last().unwrap_or(&1.0);
        let x_step = x_ticks.get(1).copied().unwrap_or(x_max);
        let x = |value: f64| LEFT + value / x_max * plot_width;
        let bottom = TOP + PLOT_HEIGHT;
        for tick in &x_ticks {
            let _ = writeln!(
                frame.svg,
                r#"<line x1="{0:.1}" y1="{bottom}" x2="{0:.1}" y2="{1:.1}" stroke="black"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{3}</text>"#,
                x(*tick),
                bottom + 5.0,
                bottom + 20.0,
                tick_label(*tick, x_step)
            );
        }
        for (index, series) in self.series.iter().enumerate() {
            let mut points = series.points.clone();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            let colour = colour(index);
            let path: Vec<String> = points
                .iter()
                .map(|(px, py)| format!("{:.1},{:.1}", x(*px), frame.y(*py)))
                .collect();
            let _ = writeln!(
                frame.svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
            for (px, py) in &points {
                let _ = writeln!(
                    frame.svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"><title>{}: {}</title></circle>"#,
                    x(*px),
                    frame.y(*py),
                    escape(&series.label),
                    format_value(*py)
                );
            }
            frame.legend(index, &series.label, "line");
        }
        frame.finish(&self.x_label, &self.caption)
    }
}

impl BarChart {
    /// The chart as an SVG document.
    pub fn to_svg(&self) -> String {
        let n_series = self.series.len().max(1);
        let bar = 18.0;
        // Room for the bars, and for the category's longest label line.
        let longest = self
            .categories
            .iter()
            .flat_map(|c| c.lines())
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(0);
        let group = (n_series as f64 * bar + 24.0).max(CHAR_WIDTH * longest as f64 + 16.0);
        let plot_width = (group * self.categories.len() as f64).max(MIN_PLOT_WIDTH);
        let y_data_max = self
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .copied()
            .fold(0.0, f64::max);
        let legend: Vec<&str> = self.series.iter().map(|s| s.label.as_str()).collect();
        let mut frame = Frame::new(
            &self.title,
            &self.y_label,
            &self.caption,
            plot_width,
            y_data_max,
            &legend,
        );
        let bottom = TOP + PLOT_HEIGHT;
        let group = plot_width / self.categories.len().max(1) as f64;
        for (c, category) in self.categories.iter().enumerate() {
            let left = LEFT + c as f64 * group + (group - n_series as f64 * bar) / 2.0;
            for (s, series) in self.series.iter().enumerate() {
                let Some(value) = series.values.get(c).copied().flatten() else {
                    continue;
                };
                let top = frame.y(value);
                let _ = writeln!(
                    frame.svg,
                    r#"<rect x="{:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}, {}: {}</title></rect>"#,
                    left + s as f64 * bar,
                    bar - 2.0,
                    bottom - top,
                    colour(s),
                    escape(&category.replace('\n', " ")),
                    escape(&series.label),
                    format_value(value)
                );
            }
            // A label line per line of the category name.
            for (line_no, line) in category.lines().enumerate() {
                let _ = writeln!(
                    frame.svg,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                    LEFT + (c as f64 + 0.5) * group,
                    bottom + 18.0 + 14.0 * line_no as f64,
                    escape(line)
                );
            }
        }
        for (index, series) in self.series.iter().enumerate() {
            frame.legend(index, &series.label, "bar");
        }
        frame.finish(&self.x_label, &self.caption)
    }
}

/// A value for a tooltip: three significant digits.
fn format_value(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else if value >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_ticks() {
        assert_eq!(ticks(9.3), [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(ticks(2048.0), [0.0, 500.0, 1000.0, 1500.0, 2000.0, 2500.0]);
        assert_eq!(ticks(0.42), [0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5]);
        // Nothing to scale: one unit.
        assert_eq!(ticks(0.0), [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        assert_eq!(ticks(f64::NAN).last(), Some(&1.0));
        assert_eq!(tick_label(0.30000000000000004, 0.1), "0.3");
        assert_eq!(tick_label(1500.0, 500.0), "1500");
        assert_eq!(tick_label(400_000.0, 100_000.0), "400k");
        assert_eq!(tick_label(0.0, 5.0), "0");
    }

    #[test]
    fn escapes_text() {
        assert_eq!(
            escape(r#"a<b & "c">'"#),
            "a&lt;b &amp; &quot;c&quot;&gt;&apos;"
        );
    }

    fn line() -> LineChart {
        LineChart {
            title: "Restore <latency>".into(),
            x_label: "guest memory (MiB)".into(),
            y_label: "time (ms)".into(),
            caption: "emulated arm64 host (QEMU TCG), ratios only".into(),
            series: vec![
                Series {
                    label: "snapshot_restore".into(),
                    points: vec![(1024.0, 8.0), (128.0, 4.0)],
                },
                Series {
                    label: "floor".into(),
                    points: vec![(128.0, 2.0)],
                },
            ],
        }
    }

    /// The values of attribute `name` on each `<element ...>` line.
    fn attr(svg: &str, element: &str, name: &str) -> Vec<String> {
        svg.lines()
            .filter(|l| l.starts_with(&format!("<{element} ")))
            .filter_map(|l| {
                let start = l.find(&format!(" {name}=\""))? + name.len() + 3;
                Some(l[start..start + l[start..].find('"')?].to_string())
            })
            .collect()
    }

    #[test]
    fn line_chart() {
        let svg = line().to_svg();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.ends_with("</svg>\n"));
        assert!(svg.contains(">Restore &lt;latency&gt;</text>"));
        assert!(svg.contains(">guest memory (MiB)</text>"));
        assert!(svg.contains(">time (ms)</text>"));
        assert!(svg.contains(">emulated arm64 host (QEMU TCG), ratios only</text>"));
        assert!(svg.contains(">snapshot_restore</text>"));
        assert!(svg.contains(">floor</text>"));
        // One polyline per series, points sorted by x: x axis 0..1500 over
        // 480 px from x=80, y axis 0..8 over 300 px from y=356.
        assert_eq!(
            attr(&svg, "polyline", "points"),
            ["121.0,206.0 407.7,56.0", "121.0,281.0"]
        );
        // A dot per point (the legend's dots share a line with its stroke).
        assert_eq!(attr(&svg, "circle", "cx").len(), 3);
        // Balanced: every element opened is closed.
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    }

    #[test]
    fn bar_chart() {
        let chart = BarChart {
            title: "Resume".into(),
            x_label: "guest memory / working set".into(),
            y_label: "time (ms)".into(),
            caption: "c".into(),
            categories: vec!["256 MiB\nseq32".into(), "1024 MiB\nall".into()],
            series: vec![
                BarSeries {
                    label: "lazy".into(),
                    values: vec![Some(10.0), Some(40.0)],
                },
                BarSeries {
                    label: "prefetch".into(),
                    values: vec![Some(5.0), None],
                },
            ],
        };
        let svg = chart.to_svg();
        // Three bars (the missing value draws none) and two legend boxes.
        let heights = attr(&svg, "rect", "height");
        assert_eq!(heights.len(), 1 + 3 + 2, "{heights:?}");
        // 0..40 over 300 px, by category then series: 10 -> 75, 5 -> 37.5,
        // 40 -> 300.
        assert_eq!(heights[1..4], ["75.0", "37.5", "300.0"]);
        // Two categories still get the minimum plot width, and the caption
        // fits in the picture.
        assert!(svg.starts_with(&format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}""#,
            80 + 480 + 60 + 7 * 8
        )));
        // A caption wider than that widens the picture: 80 + 200 * 6.5 + 20.
        let mut wide = chart.clone();
        wide.caption = "x".repeat(200);
        assert!(wide.to_svg().contains(r#" width="1400" "#));
        // Two-line category labels, one text element per line.
        assert!(svg.contains(">1024 MiB</text>"));
        assert!(svg.contains(">all</text>"));
        assert!(svg.contains(">prefetch</text>"));
        assert!(svg.contains("<title>256 MiB seq32, prefetch: 5.00</title>"));
    }
}
