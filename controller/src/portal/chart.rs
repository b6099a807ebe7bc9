//! Line charts as inline SVG, drawn on the server (pure, no I/O).
//!
//! The portal's path page plots latency, jitter, loss and score over a time range. Drawing
//! them here keeps the page working with no script at all and under a strict
//! Content-Security-Policy; the SVG holds only numbers the function formats itself and text
//! it escapes, so it is safe to embed unescaped.

use std::fmt::Write as _;

/// One series to plot: `(unix seconds, value)` in time order.
pub struct Series<'a> {
    pub title: &'a str,
    pub unit: &'a str,
    pub points: &'a [(f64, f64)],
    /// The y axis starts at 0 and reaches at least this (so a flat 0.1 % loss does not fill
    /// the chart).
    pub min_top: f64,
}

/// A vertical marker (a failover) at a time, with a label.
pub struct Marker {
    pub at: f64,
    pub label: String,
}

pub const WIDTH: f64 = 720.0;
pub const HEIGHT: f64 = 180.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 24.0;
const BOTTOM: f64 = 26.0;

/// Escape text for SVG/HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// A round upper bound for the y axis: 1, 2 or 5 × a power of ten, at least `value`.
pub fn nice_top(value: f64) -> f64 {
    if !(value.is_finite() && value > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if step * magnitude >= value {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn clock(unix: f64, span: f64) -> String {
    let Some(at) = chrono::DateTime::<chrono::Utc>::from_timestamp(unix as i64, 0) else {
        return String::new();
    };
    if span > 2.0 * 86_400.0 {
        at.format("%m-%d %H:%M").to_string()
    } else {
        at.format("%H:%M").to_string()
    }
}

/// The chart of `series` over `[from, to]` (unix seconds) with `markers`, as an `<svg>`
/// element with id `id`.
pub fn line_chart(id: &str, series: &Series, from: f64, to: f64, markers: &[Marker]) -> String {
    let span = (to - from).max(1.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let finite: Vec<(f64, f64)> = series
        .points
        .iter()
        .copied()
        .filter(|(t, v)| t.is_finite() && v.is_finite() && *t >= from && *t <= to)
        .collect();
    let highest = finite.iter().map(|(_, v)| *v).fold(0.0, f64::max);
    let top = nice_top(highest.max(series.min_top));
    let x = |t: f64| LEFT + (t - from) / span * plot_w;
    let y = |v: f64| TOP + plot_h - (v.clamp(0.0, top) / top) * plot_h;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg id="{id}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{title} over time" xmlns="http://www.w3.org/2000/svg">"#,
        id = escape(id),
        title = escape(series.title),
    );
    let _ = write!(
        svg,
        r#"<text class="chart-title" x="{LEFT}" y="15">{} ({})</text>"#,
        escape(series.title),
        escape(series.unit)
    );
    // Grid: 0, half and top.
    for fraction in [0.0, 0.5, 1.0] {
        let value = top * fraction;
        let gy = y(value);
        let _ = write!(
            svg,
            r#"<line class="grid" x1="{LEFT}" y1="{gy:.1}" x2="{x2:.1}" y2="{gy:.1}"/><text class="axis" x="{tx:.1}" y="{ty:.1}" text-anchor="end">{label}</text>"#,
            x2 = WIDTH - RIGHT,
            tx = LEFT - 6.0,
            ty = gy + 4.0,
            label = format_value(value),
        );
    }
    for (anchor, t) in [("start", from), ("end", to)] {
        let _ = write!(
            svg,
            r#"<text class="axis" x="{tx:.1}" y="{ty:.1}" text-anchor="{anchor}">{label}</text>"#,
            tx = x(t),
            ty = HEIGHT - 8.0,
            label = clock(t, span),
        );
    }
    for marker in markers.iter().filter(|m| m.at >= from && m.at <= to) {
        let mx = x(marker.at);
        let _ = write!(
            svg,
            r#"<line class="marker" x1="{mx:.1}" y1="{TOP}" x2="{mx:.1}" y2="{y2:.1}"><title>{label}</title></line>"#,
            y2 = TOP + plot_h,
            label = escape(&marker.label),
        );
    }
    if finite.is_empty() {
        let _ = write!(
            svg,
            r#"<text class="empty" x="{cx:.1}" y="{cy:.1}" text-anchor="middle">no samples in this range</text>"#,
            cx = LEFT + plot_w / 2.0,
            cy = TOP + plot_h / 2.0,
        );
    } else {
        svg.push_str(r#"<polyline class="series" points=""#);
        for (i, (t, v)) in finite.iter().enumerate() {
            if i > 0 {
                svg.push(' ');
            }
            let _ = write!(svg, "{:.1},{:.1}", x(*t), y(*v));
        }
        svg.push_str(r#""/>"#);
        // A polyline of one point draws nothing: a fresh path's first minute would look
        // like an empty chart that does not say "no samples".
        if let [(t, v)] = finite[..] {
            let _ = write!(
                svg,
                r#"<circle class="series-point" cx="{:.1}" cy="{:.1}" r="3"/>"#,
                x(t),
                y(v)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

fn format_value(value: f64) -> String {
    if value >= 100.0 || value == 0.0 {
        format!("{value:.0}")
    } else if value >= 1.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn coordinates(svg: &str) -> Vec<(f64, f64)> {
        let start = svg.find("points=\"").expect("a polyline") + 8;
        let end = start + svg[start..].find('"').expect("closing quote");
        svg[start..end]
            .split(' ')
            .map(|pair| {
                let (x, y) = pair.split_once(',').expect("x,y");
                (x.parse().expect("x"), y.parse().expect("y"))
            })
            .collect()
    }

    #[test]
    fn round_axis_tops() {
        assert_eq!(nice_top(0.0), 1.0);
        assert_eq!(nice_top(f64::NAN), 1.0);
        assert_eq!(nice_top(0.7), 1.0);
        assert_eq!(nice_top(1.3), 2.0);
        assert_eq!(nice_top(3.0), 5.0);
        assert_eq!(nice_top(61.0), 100.0);
        assert_eq!(nice_top(100.0), 100.0);
    }

    #[test]
    fn an_empty_range_says_so_and_text_is_escaped() {
        let svg = line_chart(
            "c",
            &Series {
                title: "<b>latency</b>",
                unit: "ms",
                points: &[],
                min_top: 10.0,
            },
            0.0,
            3600.0,
            &[Marker {
                at: 60.0,
                label: "failover <x>".into(),
            }],
        );
        assert!(svg.contains("no samples in this range"));
        assert!(!svg.contains("<b>"), "{svg}");
        assert!(svg.contains("&lt;b&gt;latency"));
        assert!(svg.contains("failover &lt;x&gt;"));
        assert!(svg.contains(r#"class="marker""#));
    }

    #[test]
    fn a_lone_sample_is_drawn_as_a_dot() {
        let series = |points| Series {
            title: "t",
            unit: "u",
            points,
            min_top: 10.0,
        };
        let one = line_chart("c", &series(&[(60.0, 5.0)]), 0.0, 3600.0, &[]);
        assert!(one.contains(r#"<circle class="series-point""#), "{one}");
        assert!(!one.contains("no samples"), "{one}");
        let two = line_chart("c", &series(&[(60.0, 5.0), (120.0, 6.0)]), 0.0, 3600.0, &[]);
        assert!(!two.contains("<circle"), "{two}");
    }

    proptest! {
        /// Every plotted point lies inside the plot area, in time order left to right, and
        /// a higher value is never drawn lower.
        #[test]
        fn points_stay_inside_and_keep_their_order(
            values in proptest::collection::vec(0.0f64..1e4, 1..50),
        ) {
            let points: Vec<(f64, f64)> =
                values.iter().enumerate().map(|(i, v)| (i as f64 * 10.0, *v)).collect();
            let svg = line_chart(
                "c",
                &Series { title: "t", unit: "u", points: &points, min_top: 1.0 },
                0.0,
                500.0,
                &[],
            );
            let drawn = coordinates(&svg);
            prop_assert_eq!(drawn.len(), points.len());
            for (i, (x, y)) in drawn.iter().enumerate() {
                prop_assert!(*x >= LEFT - 0.1 && *x <= WIDTH - RIGHT + 0.1);
                prop_assert!(*y >= TOP - 0.1 && *y <= HEIGHT - BOTTOM + 0.1);
                if i > 0 {
                    prop_assert!(*x >= drawn[i - 1].0);
                    let (previous, now) = (points[i - 1].1, points[i].1);
                    if now > previous {
                        prop_assert!(*y <= drawn[i - 1].1 + 0.1);
                    }
                }
            }
        }
    }
}
