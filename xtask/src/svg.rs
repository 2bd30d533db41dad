//! Hand-written SVG plots: a line plot (one line per series) and a bar chart with an optional
//! ceiling line. Plain SVG 1.1, no scripts, no external fonts.

use std::fmt::Write;

const W: f64 = 680.0;
const H: f64 = 420.0;
const ML: f64 = 70.0;
const MR: f64 = 170.0;
const MT: f64 = 40.0;
const MB: f64 = 55.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// One named series of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend label.
    pub name: String,
    /// Points, drawn in x order.
    pub points: Vec<(f64, f64)>,
}

/// Escapes text for XML content and attribute values.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Tick values for `[lo, hi]`: about five "nice" steps (1, 2, 5 × 10^k).
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater)
        || !lo.is_finite()
        || !hi.is_finite()
    {
        return vec![lo];
    }
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    // Up to the first tick at or above `hi`, so the axis covers every value.
    while out.len() < 20 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        if t >= hi - step * 1e-9 {
            break;
        }
        t += step;
    }
    out
}

/// A series' colour: fixed for the KV policies and the FreeKV variants (the first policy named
/// in the label, so every plot agrees), else by position.
fn color_of(name: &str, i: usize) -> &'static str {
    let policy = name.split([' ', ',', ':']).find(|w| {
        matches!(*w, "full" | "quest" | "arkvale" | "freekv" | "oracle") || w.starts_with("freekv-")
    });
    match policy {
        Some("full") => COLORS[0],
        Some("quest") => COLORS[4],
        Some("arkvale") => COLORS[1],
        Some("freekv") => COLORS[2],
        Some("oracle") => COLORS[5],
        Some("freekv-spec") => COLORS[6],
        Some("freekv-streamed") => COLORS[7],
        Some(_) => COLORS[3],
        None => COLORS[i % COLORS.len()],
    }
}

/// Dash pattern of the `n`-th series drawn in the same colour (solid first).
fn dash_of(n: usize) -> &'static str {
    [
        "",
        " stroke-dasharray=\"7 4\"",
        " stroke-dasharray=\"2 3\"",
        " stroke-dasharray=\"10 3 2 3\"",
    ][n % 4]
}

/// Number formatting for tick labels.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 || (v.fract() == 0.0 && a >= 1.0) {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        let t = format!("{v:.3}");
        t.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn header(out: &mut String, title: &str, w: f64) {
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{H}\" viewBox=\"0 0 {w} {H}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        w / 2.0,
        esc(title)
    );
}

/// How a y value maps onto its axis (identity, or log10).
type YTransform = fn(f64) -> f64;

/// Legend width for these labels (about 7 px a character at font size 12), at least `MR`.
fn legend_width(series: &[Series]) -> f64 {
    let longest = series
        .iter()
        .map(|s| s.name.chars().count())
        .max()
        .unwrap_or(0);
    (34.0 + 7.0 * longest as f64).max(MR)
}

/// Tick values of a log10 axis over [lo, hi] (both > 0): 1, 2, 5 × 10^k inside the range,
/// with the range widened to whole decades.
fn log_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<f64>) {
    let k0 = lo.log10().floor();
    let mut k1 = hi.log10().ceil();
    if k1 <= k0 {
        k1 = k0 + 1.0;
    }
    let mut t = Vec::new();
    let mut k = k0;
    while k <= k1 && t.len() < 40 {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powf(k);
            if v.log10() <= k1 + 1e-9 {
                t.push(v);
            }
        }
        k += 1.0;
    }
    (k0, k1, t)
}

fn axes_labels(out: &mut String, x_label: &str, y_label: &str) {
    let _ = write!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">{}</text>\n",
        ML + (W - ML - MR) / 2.0,
        H - 12.0,
        esc(x_label),
        MT + (H - MT - MB) / 2.0,
        MT + (H - MT - MB) / 2.0,
        esc(y_label)
    );
}

/// A line plot. With `log2_x`, the x axis is logarithmic (base 2) with ticks at the data's x
/// values (contexts, batch sizes). The y axis starts at 0. Every point is drawn as a circle
/// with a `<title>` giving its value.
pub fn line_plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log2_x: bool,
) -> String {
    line_plot_ext(title, x_label, y_label, series, log2_x, false)
}

/// [`line_plot`], with a logarithmic (base 10) y axis when `log10_y` (for values spanning
/// decades, such as step times of policies tens of times apart; points with y ≤ 0 are left
/// out). The legend is as wide as its longest label.
pub fn line_plot_ext(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log2_x: bool,
    log10_y: bool,
) -> String {
    let mut out = String::new();
    let mr = legend_width(series);
    let w = W - MR + mr;
    header(&mut out, title, w);
    axes_labels(&mut out, x_label, y_label);
    let keep = |x: f64, y: f64| {
        x.is_finite() && y.is_finite() && (!log2_x || x > 0.0) && (!log10_y || y > 0.0)
    };
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| keep(*x, *y))
        .collect();
    if pts.is_empty() {
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data</text>",
            w / 2.0,
            H / 2.0
        );
        out.push_str("</svg>\n");
        return out;
    }
    let tx = |x: f64| if log2_x { x.log2() } else { x };
    let (mut x0, mut x1) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(tx(p.0)), b.max(tx(p.0)))
    });
    if x1 - x0 < 1e-12 {
        x0 -= 1.0;
        x1 += 1.0;
    }
    let ymax = pts.iter().fold(0f64, |a, p| a.max(p.1));
    let ymin = pts.iter().fold(f64::MAX, |a, p| a.min(p.1));
    // The y axis as (transform, low, high, ticks).
    let (ty, ylo, yhi, yticks): (YTransform, f64, f64, Vec<f64>) = if log10_y {
        let (k0, k1, t) = log_ticks(ymin, ymax);
        (f64::log10, k0, k1, t)
    } else {
        let t = nice_ticks(0.0, if ymax > 0.0 { ymax * 1.05 } else { 1.0 });
        let y1 = t.last().copied().unwrap_or(1.0).max(ymax).max(1e-12);
        (|y| y, 0.0, y1, t)
    };
    let pw = W - ML - MR;
    let ph = H - MT - MB;
    let px = |x: f64| ML + (tx(x) - x0) / (x1 - x0) * pw;
    let py = |y: f64| MT + ph - (ty(y) - ylo) / (yhi - ylo) * ph;
    // Grid and ticks.
    for t in &yticks {
        let _ = write!(
            out,
            "<line x1=\"{ML}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            ML + pw,
            ML - 6.0,
            py(*t) + 4.0,
            fmt_num(*t),
            y = py(*t)
        );
    }
    let mut xs: Vec<f64> = if log2_x {
        pts.iter().map(|p| p.0).collect()
    } else {
        nice_ticks(x0, x1)
    };
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        let _ = write!(
            out,
            "<line x1=\"{X:.1}\" y1=\"{MT}\" x2=\"{X:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>\n\
             <text x=\"{X:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            MT + ph,
            MT + ph + 16.0,
            fmt_num(x),
            X = px(x)
        );
    }
    let _ = writeln!(
        out,
        "<rect x=\"{ML}\" y=\"{MT}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"black\"/>"
    );
    let colors: Vec<&str> = series
        .iter()
        .enumerate()
        .map(|(i, s)| color_of(&s.name, i))
        .collect();
    for (i, s) in series.iter().enumerate() {
        let c = colors[i];
        let dash = dash_of(colors[..i].iter().filter(|x| **x == c).count());
        let mut p: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| keep(*x, *y))
            .collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        if p.len() > 1 {
            let d: Vec<String> = p
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect();
            let _ = writeln!(
                out,
                "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"2\"{dash} points=\"{}\"/>",
                d.join(" ")
            );
        }
        for (x, y) in &p {
            let _ = writeln!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{c}\"><title>{}: x={} y={}</title></circle>",
                px(*x),
                py(*y),
                esc(&s.name),
                fmt_num(*x),
                fmt_num(*y)
            );
        }
        let ly = MT + 10.0 + 18.0 * i as f64;
        let lx = ML + pw + 12.0;
        let _ = write!(
            out,
            "<line x1=\"{lx}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{c}\" stroke-width=\"3\"{dash}/>\n\
             <text x=\"{}\" y=\"{}\">{}</text>\n",
            lx + 18.0,
            lx + 24.0,
            ly + 4.0,
            esc(&s.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A horizontal bar chart (one bar per label) with an optional vertical ceiling line.
pub fn bar_plot(
    title: &str,
    x_label: &str,
    bars: &[(String, f64)],
    ceiling: Option<(&str, f64)>,
) -> String {
    let mut out = String::new();
    // Labels up to about 34 characters fit the 250 px on the left; longer ones widen it.
    let longest = bars.iter().map(|b| b.0.chars().count()).max().unwrap_or(0);
    let left = (7.0 * longest as f64 + 16.0).max(250.0);
    let w = W - 250.0 + left;
    let right = 40.0;
    let bh = 18.0;
    let h = (MT + MB + bh * 1.4 * bars.len().max(1) as f64).max(160.0);
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        w / 2.0,
        esc(title)
    );
    let vmax = bars
        .iter()
        .map(|b| b.1)
        .chain(ceiling.map(|c| c.1))
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max);
    let ticks = nice_ticks(0.0, if vmax > 0.0 { vmax * 1.05 } else { 1.0 });
    let v1 = ticks.last().copied().unwrap_or(1.0).max(vmax).max(1e-12);
    let pw = w - left - right;
    let ph = h - MT - MB;
    let px = |v: f64| left + v / v1 * pw;
    for t in &ticks {
        let _ = write!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{MT}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            MT + ph,
            MT + ph + 16.0,
            fmt_num(*t),
            x = px(*t)
        );
    }
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = MT + 4.0 + bh * 1.4 * i as f64;
        let v = if v.is_finite() { v.max(0.0) } else { 0.0 };
        let _ = write!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n\
             <rect x=\"{left}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh}\" fill=\"{}\"><title>{}: {}</title></rect>\n\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            left - 6.0,
            y + bh - 5.0,
            esc(label),
            px(v) - left,
            COLORS[0],
            esc(label),
            fmt_num(v),
            px(v) + 4.0,
            y + bh - 5.0,
            fmt_num(v)
        );
    }
    if let Some((name, c)) = ceiling.filter(|c| c.1.is_finite()) {
        let _ = write!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{MT}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"2\" stroke-dasharray=\"6 4\"/>\n\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"{}\">{}</text>\n",
            MT + ph,
            COLORS[1],
            MT - 4.0,
            COLORS[1],
            esc(&format!("{name}: {}", fmt_num(c))),
            x = px(c)
        );
    }
    let _ = write!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n</svg>\n",
        left + pw / 2.0,
        h - 12.0,
        esc(x_label)
    );
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal well-formedness check: every `<tag` is closed by `</tag>` or `/>` in order,
    /// attribute quotes balance, no stray `&` outside entities.
    pub(crate) fn well_formed(s: &str) -> bool {
        let mut stack: Vec<String> = Vec::new();
        let mut rest = s;
        while let Some(i) = rest.find('<') {
            let text = &rest[..i];
            if text.contains('>') || !entities_ok(text) {
                return false;
            }
            let Some(j) = rest[i..].find('>') else {
                return false;
            };
            let tag = &rest[i + 1..i + j];
            rest = &rest[i + j + 1..];
            if !tag.matches('"').count().is_multiple_of(2) || !entities_ok(tag) {
                return false;
            }
            if let Some(name) = tag.strip_prefix('/') {
                if stack.pop().as_deref() != Some(name.trim()) {
                    return false;
                }
            } else if !tag.ends_with('/') {
                let name = tag
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                stack.push(name);
            }
        }
        stack.is_empty() && !rest.contains('>')
    }

    /// Every coordinate-like attribute holds a finite number.
    pub(crate) fn coords_numeric(s: &str) -> bool {
        [
            " x=\"",
            " y=\"",
            " x1=\"",
            " y1=\"",
            " x2=\"",
            " y2=\"",
            " cx=\"",
            " cy=\"",
            " width=\"",
            " height=\"",
        ]
        .iter()
        .all(|a| {
            s.match_indices(a).all(|(i, _)| {
                let v = s[i + a.len()..].split('"').next().unwrap_or_default();
                v.parse::<f64>().is_ok_and(f64::is_finite)
            })
        })
    }

    fn entities_ok(t: &str) -> bool {
        t.match_indices('&').all(|(i, _)| {
            let r = &t[i..];
            ["&amp;", "&lt;", "&gt;", "&quot;"]
                .iter()
                .any(|e| r.starts_with(e))
        })
    }

    #[test]
    fn checker_rejects_broken_xml() {
        assert!(well_formed("<svg><g a=\"1\"/></svg>"));
        assert!(!well_formed("<svg><g></svg>"));
        assert!(!well_formed("<svg>a & b</svg>"));
        assert!(!well_formed("<svg a=\"1></svg>"));
    }

    #[test]
    fn line_plot_has_every_point_and_is_well_formed() {
        let s = vec![
            Series {
                name: "full".into(),
                points: vec![(512.0, 7.5), (2048.0, 9.25)],
            },
            Series {
                name: "freekv <b=256> & co".into(),
                points: vec![(512.0, 6.0), (2048.0, 6.5)],
            },
        ];
        let svg = line_plot("step time", "context", "ms", &s, true);
        assert!(well_formed(&svg) && coords_numeric(&svg), "{svg}");
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert_eq!(svg.matches("<circle").count(), 4);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("full: x=512 y=7.5"));
        assert!(svg.contains("x=2048 y=9.3") || svg.contains("x=2048 y=9.2"));
        assert!(svg.contains("freekv &lt;b=256&gt; &amp; co"));
        // Larger y is drawn higher (smaller SVG y).
        let cy = |needle: &str| -> f64 {
            let i = svg.find(needle).unwrap();
            let pre = &svg[..i];
            let c = pre.rfind("cy=\"").unwrap();
            pre[c + 4..].split('"').next().unwrap().parse().unwrap()
        };
        assert!(cy("full: x=2048") < cy("full: x=512"));
        // A second series of the same policy is dashed, line and legend alike.
        let mut s2 = s.clone();
        s2.push(Series {
            name: "b4 full".into(),
            points: vec![(512.0, 8.0), (2048.0, 10.0)],
        });
        let svg = line_plot("step time", "context", "ms", &s2, true);
        assert!(well_formed(&svg), "{svg}");
        assert_eq!(svg.matches("stroke-dasharray=\"7 4\"").count(), 2);
    }

    #[test]
    fn empty_and_degenerate_plots_stay_valid() {
        let svg = line_plot("t", "x", "y", &[], false);
        assert!(well_formed(&svg) && svg.contains("no data"));
        let one = vec![Series {
            name: "a".into(),
            points: vec![(1.0, 0.0)],
        }];
        let svg = line_plot("t", "x", "y", &one, false);
        assert!(well_formed(&svg) && coords_numeric(&svg) && !svg.contains("NaN"));
    }

    #[test]
    fn bar_plot_has_bars_and_ceiling() {
        let bars = vec![
            ("double_buffered/256".to_string(), 12.5),
            ("sync_direct/256".to_string(), 8.0),
        ];
        let svg = bar_plot("recall", "GB/s", &bars, Some(("copy bandwidth", 20.0)));
        assert!(well_formed(&svg) && coords_numeric(&svg), "{svg}");
        assert_eq!(svg.matches("<rect").count(), 3); // background + 2 bars
        assert!(svg.contains("double_buffered/256: 12.5"));
        assert!(svg.contains("copy bandwidth: 20"));
        assert!(svg.contains("stroke-dasharray"));
    }

    #[test]
    fn policy_colours_are_stable_and_numbers_short() {
        assert_eq!(color_of("freekv", 0), color_of("cpu freekv", 3));
        assert_eq!(
            color_of("b4 freekv", 0),
            color_of("freekv vs arkvale, ctx 4096", 1)
        );
        assert_eq!(color_of("ctx 4096 oracle", 0), COLORS[5]);
        assert_eq!(color_of("llama b1", 3), COLORS[3]);
        assert_eq!(color_of("b4 freekv-spec", 0), COLORS[6]);
        assert_ne!(color_of("b4 freekv-streamed", 0), color_of("b4 freekv", 0));
        assert_eq!(dash_of(0), "");
        assert_ne!(dash_of(1), dash_of(2));
        assert_ne!(color_of("full", 0), color_of("freekv", 0));
        assert_eq!(fmt_num(0.5), "0.5");
        assert_eq!(fmt_num(0.125), "0.125");
        assert_eq!(fmt_num(12.25), "12.2");
        assert_eq!(fmt_num(2048.0), "2048");
    }

    #[test]
    fn log_y_and_wide_legends() {
        let s = vec![
            Series {
                name: "b1 full".into(),
                points: vec![(1024.0, 4.6), (32768.0, 6.1)],
            },
            Series {
                name: "a much longer legend label than the margin holds".into(),
                points: vec![(1024.0, 5.7), (32768.0, 295.0), (2048.0, 0.0)],
            },
        ];
        let svg = line_plot_ext("t", "x", "y", &s, true, true);
        assert!(well_formed(&svg) && coords_numeric(&svg), "{svg}");
        // Ticks 1, 2, 5, 10, ... 1000 over the decades 1..1000; the zero is left out.
        for t in [">1<", ">2<", ">5<", ">10<", ">100<", ">1000<"] {
            assert!(svg.contains(t), "{t} {svg}");
        }
        assert_eq!(svg.matches("<circle").count(), 4);
        // Equal ratios are equal distances on a log axis: 10 → 100 as 100 → 1000.
        let tick_y = |v: &str| -> f64 {
            let i = svg.find(&format!(">{v}</text>")).unwrap();
            let pre = &svg[..i];
            let c = pre.rfind(" y=\"").unwrap();
            pre[c + 4..].split('"').next().unwrap().parse().unwrap()
        };
        let (a, b, c) = (tick_y("10"), tick_y("100"), tick_y("1000"));
        assert!(((a - b) - (b - c)).abs() < 0.2, "{a} {b} {c}");
        // The legend grows with its longest label, and the picture with it.
        let w: f64 = svg
            .split("width=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(w > W, "{w}");
        assert_eq!(log_ticks(4.6, 295.0).0, 0.0);
        assert_eq!(log_ticks(4.6, 295.0).1, 3.0);
        assert_eq!(log_ticks(5.0, 5.0).1, 1.0);
    }

    #[test]
    fn ticks_are_nice() {
        assert_eq!(nice_ticks(0.0, 10.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(nice_ticks(0.0, 18.1), vec![0.0, 5.0, 10.0, 15.0, 20.0]);
        let t = nice_ticks(0.0, 1.0);
        assert_eq!(t.len(), 6);
        assert!((t[3] - 0.6).abs() < 1e-9 && (t[5] - 1.0).abs() < 1e-9);
    }
}
