//! Hand-written SVG grouped bar charts (no plotting dependency), in the style of the
//! line charts of `benches/harness/src/svg.rs`.

use std::fmt::Write as _;

const COLORS: [&str; 8] = [
    "#7f7f7f", "#1f77b4", "#2ca02c", "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
];

/// One bar series: a legend name and one value per group (NaN: no bar).
pub struct Bars {
    /// Legend text.
    pub name: String,
    /// One value per group.
    pub values: Vec<f64>,
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * p {
            return m * p;
        }
    }
    10.0 * p
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A grouped bar chart: one group per entry of `groups`, one bar per series in each, a
/// dashed reference line at `reference` (1.0 for normalised charts). Bars taller than
/// `cap` times the reference are clipped and labelled with their value.
pub fn bar_chart(
    title: &str,
    ylabel: &str,
    groups: &[String],
    series: &[Bars],
    reference: f64,
    cap: f64,
) -> String {
    let n_groups = groups.len().max(1);
    let n_series = series.len().max(1);
    let bar_w = 14.0;
    let group_w = bar_w * n_series as f64 + 18.0;
    // The top margin leaves room for the labels of clipped bars under the title.
    let (l, r, t, b) = (64.0, 150.0, 60.0, 40.0);
    let pw = (group_w * n_groups as f64).max(360.0);
    let (w, h) = (l + pw + r, 440.0);
    let ph = h - t - b;
    let limit = reference * cap;
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(reference, f64::max)
        .min(limit);
    let ymax = nice_max(top * 1.05);
    let sy = |y: f64| t + ph - y.min(ymax) / ymax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        l + pw / 2.0,
        esc(title)
    );
    for i in 0..=5 {
        let fy = ymax * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{1}" x2="{2}" y2="{1}" stroke="#eee"/><text x="{3}" y="{4}" text-anchor="end">{5}</text>"##,
            l,
            sy(fy),
            l + pw,
            l - 6.0,
            sy(fy) + 4.0,
            fmt_tick(fy)
        );
    }
    for (gi, g) in groups.iter().enumerate() {
        let gx = l + pw / n_groups as f64 * gi as f64;
        let x0 = gx + (pw / n_groups as f64 - bar_w * n_series as f64) / 2.0;
        for (si, ser) in series.iter().enumerate() {
            let v = ser.values.get(gi).copied().unwrap_or(f64::NAN);
            if !v.is_finite() {
                continue;
            }
            let c = COLORS[si % COLORS.len()];
            let x = x0 + bar_w * si as f64;
            let y = sy(v);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{c}"><title>{}: {} {v:.3}</title></rect>"#,
                bar_w - 1.0,
                t + ph - y,
                esc(&ser.name),
                esc(g)
            );
            if v > ymax {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" font-size="9" text-anchor="middle">{}</text>"#,
                    x + bar_w / 2.0,
                    t - 3.0 - 9.0 * (si % 2) as f64,
                    fmt_tick(v)
                );
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + pw / n_groups as f64 / 2.0,
            t + ph + 16.0,
            esc(g)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{l}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#333" stroke-dasharray="4 3"/>"##,
        sy(reference),
        l + pw
    );
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{0}" text-anchor="middle" transform="rotate(-90 16 {0})">{1}</text>"#,
        t + ph / 2.0,
        esc(ylabel)
    );
    for (i, ser) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let ly = t + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{0}" y="{1}" width="14" height="10" fill="{c}"/><text x="{2}" y="{3}">{4}</text>"#,
            l + pw + 12.0,
            ly - 5.0,
            l + pw + 32.0,
            ly + 4.0,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}
