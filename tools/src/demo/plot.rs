//! The demo's plot: load per instance over time (one line each), with every `Migrate` call
//! marked at its time (solid: moved a request; dashed: refused or failed). Plain SVG, written by
//! hand: no plotting crate for one chart.

use std::fmt::Write;

use super::{Call, Sample};

const W: f64 = 960.0;
const H: f64 = 420.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLORS: [&str; 8] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document.
pub fn svg(ids: &[String], samples: &[Vec<Sample>], calls: &[Call], duration: f64) -> String {
    let ymax = samples
        .iter()
        .flatten()
        .map(|s| s.load)
        .fold(1.0f64, f64::max)
        .ceil();
    let tmax = duration.max(1.0);
    let x = |t: f64| LEFT + (t / tmax).clamp(0.0, 1.0) * (W - LEFT - RIGHT);
    let y = |l: f64| TOP + (1.0 - (l / ymax).clamp(0.0, 1.0)) * (H - TOP - BOTTOM);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="22" font-size="15">llumlet demo: load per instance ((used + waiting KV tokens) / capacity), migrations marked</text>
"#
    );
    // Axes and grid.
    let steps = (ymax * 4.0) as usize;
    for k in 0..=steps {
        let l = ymax * k as f64 / steps as f64;
        let yy = y(l);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}%</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            l * 100.0
        );
    }
    let tick = if tmax > 60.0 { 10.0 } else { 5.0 };
    let mut t = 0.0;
    while t <= tmax + 1e-9 {
        let xx = x(t);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#999"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{t:.0}s</text>"##,
            H - BOTTOM,
            H - BOTTOM + 5.0,
            H - BOTTOM + 18.0
        );
        t += tick;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{:.1}" height="{:.1}" fill="none" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="middle">time</text>"##,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM,
        (W - RIGHT + LEFT) / 2.0,
        H - 10.0
    );
    // Migrations.
    for c in calls {
        let xx = x(c.t);
        let color = COLORS[c.src % COLORS.len()];
        let dash = if c.ok {
            ""
        } else {
            r#" stroke-dasharray="4 3""#
        };
        let _ = writeln!(
            s,
            r#"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="{color}" stroke-opacity="0.5"{dash}><title>{:.1}s: {} → {} {}</title></line>"#,
            H - BOTTOM,
            c.t,
            esc(&ids[c.src]),
            esc(&ids[c.dst]),
            if c.ok { "migrated" } else { "refused" }
        );
    }
    // Load lines and legend.
    for (i, series) in samples.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = series
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.t), y(p.load)))
            .collect();
        if !pts.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                pts.join(" ")
            );
        }
        let ly = TOP + 20.0 * i as f64 + 10.0;
        let lx = W - RIGHT + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            esc(&ids[i])
        );
    }
    let ly = TOP + 20.0 * samples.len() as f64 + 20.0;
    let lx = W - RIGHT + 15.0;
    let _ = writeln!(
        s,
        r##"<line x1="{lx:.1}" y1="{:.1}" x2="{lx:.1}" y2="{:.1}" stroke="#666"/><text x="{:.1}" y="{ly:.1}">migration (colour: source)</text>"##,
        ly - 10.0,
        ly + 4.0,
        lx + 8.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_instance_and_one_mark_per_call() {
        let ids = vec!["a".to_string(), "b<&>".to_string()];
        let samples = vec![
            vec![
                Sample {
                    t: 0.0,
                    load: 0.5,
                    running: 1,
                    waiting: 0,
                },
                Sample {
                    t: 1.0,
                    load: 1.7,
                    running: 2,
                    waiting: 3,
                },
            ],
            vec![Sample {
                t: 0.5,
                load: 0.1,
                running: 0,
                waiting: 0,
            }],
        ];
        let calls = vec![Call {
            t: 0.7,
            src: 0,
            dst: 1,
            ok: true,
            message: String::new(),
        }];
        let s = svg(&ids, &samples, &calls, 2.0);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert_eq!(s.matches("<title>").count(), 1);
        assert!(s.contains("b&lt;&amp;&gt;") && !s.contains("b<&>"));
        assert!(s.contains(">200%<"), "the y axis reaches the highest load");
    }
}
