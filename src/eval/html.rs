//! The report as one self-contained HTML page: the metric table, bar charts in inline SVG,
//! every side's answers side by side and the settings and file hashes each side ran with.
//! No scripts, fonts, stylesheets or images from elsewhere: the file opens offline.

use super::report::{fmt_num, metrics, Metric, Report};
use super::run::{ItemResult, SideResult};
use super::tofu::SetKind;
use serde_json::Value;

/// One colour per side; the reference is grey.
const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f",
];
const REF_COLOUR: &str = "#9aa0a6";
/// The bottom of the forget-quality axis (p-values below are drawn at it).
const LOG_MIN: f64 = 1e-20;
/// Retain-set questions shown side by side.
const RETAIN_SAMPLE: usize = 20;
/// More sides than this: the metric table has a row per side, and the bar charts and answer
/// columns are left out (a sweep, or several evaluations merged).
const WIDE: usize = 6;

const CSS: &str = "\
body{margin:0;background:#f7f7f5;color:#222;font:15px/1.5 system-ui,-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 .3em}h2{font-size:1.25em;margin:2em 0 .6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{font-size:1.05em;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff;font-size:14px}
th,td{border:1px solid #e3e3e0;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f0f0ec;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.ref{background:#f4f4f4}.note,.muted{color:#888;font-size:12px}.wrap{overflow-x:auto}
.answers{table-layout:fixed;width:100%}.answers td{overflow-wrap:anywhere}.answers th.n{width:2.5em}
.score{color:#666;font-size:12px;margin-top:4px;font-variant-numeric:tabular-nums}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(440px,1fr));gap:16px}
figure{margin:0;background:#fff;border:1px solid #e3e3e0;border-radius:6px;padding:12px}
figcaption{font-weight:600;margin-bottom:8px}
svg{max-width:100%;height:auto;font:11px system-ui,sans-serif}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
code,pre{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:#fff;border:1px solid #e3e3e0;padding:8px;overflow-x:auto}summary{cursor:pointer}
";

/// `s` with `& < > " '` escaped, safe in text and in quoted attributes.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A column of the report: a side, whether it is the reference, its label and colour.
struct Col<'a> {
    side: &'a SideResult,
    is_ref: bool,
    label: String,
    colour: &'static str,
}

fn columns(r: &Report) -> Vec<Col<'_>> {
    let reference = r.reference.iter().map(|s| (s, true));
    let all = r.sides.iter().map(|s| (s, false)).chain(reference);
    all.enumerate()
        .map(|(i, (side, is_ref))| Col {
            side,
            is_ref,
            label: side.name.clone() + if is_ref { " (reference)" } else { "" },
            colour: if is_ref {
                REF_COLOUR
            } else {
                PALETTE[i % PALETTE.len()]
            },
        })
        .collect()
}

/// The whole page.
pub fn render(report: &Report) -> String {
    let cols = columns(report);
    let split = esc(&report.split);
    let mut o = format!("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>Unlearning evaluation: {split}</title>\n<style>\n{CSS}</style>\n</head>\n<body>\n<main>\n");
    o += &header(report, &cols);
    o += "<h2>Metrics</h2>\n";
    if cols.len() > WIDE {
        o += &metric_rows(&cols);
    } else {
        o += &metric_table(&cols);
    }
    o += "<h2>Charts</h2>\n<div class=\"charts\">\n";
    o += &tradeoff(
        "Forget quality against model utility",
        "model utility",
        &cols,
        |s| s.model_utility,
    );
    o += &tradeoff(
        "Forget quality against scored utility (model utility without ROUGE)",
        "scored utility",
        &cols,
        |s| s.scored_utility,
    );
    if cols.len() <= WIDE {
        o += &charts(&cols);
    }
    o += "</div>\n<h2>Answers</h2>\n";
    // Answers side by side for the sides that generated them (at most WIDE of them).
    let gen: Vec<&Col> = cols
        .iter()
        .filter(|c| {
            c.side
                .set(SetKind::Forget)
                .is_some_and(|s| s.items.iter().any(|i| i.generated.is_some()))
        })
        .take(WIDE)
        .collect();
    let gen: Vec<Col> = gen
        .into_iter()
        .map(|c| Col {
            side: c.side,
            is_ref: c.is_ref,
            label: c.label.clone(),
            colour: c.colour,
        })
        .collect();
    if gen.is_empty() {
        o += "<p class=\"muted\">No side generated answers (a score-only evaluation).</p>\n";
    }
    o += &answers("Forget set", &gen, SetKind::Forget, usize::MAX);
    let retain = format!("Retain set (first {RETAIN_SAMPLE})");
    o += &answers(&retain, &gen, SetKind::Retain, RETAIN_SAMPLE);
    o += "<h2>Settings and file hashes</h2>\n";
    for c in &cols {
        o += &audit(c);
    }
    o + "</main>\n</body>\n</html>\n"
}

/// A JSON value as text: strings bare, `null` as a dash, the rest compact JSON.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "\u{2013}".into(),
        v => v.to_string(),
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn swatch(c: &Col) -> String {
    let (colour, label) = (c.colour, esc(&c.label));
    format!("<span class=\"sw\" style=\"background:{colour}\"></span>{label}")
}

fn header(r: &Report, cols: &[Col]) -> String {
    let split = esc(&r.split);
    let limit = r.limit.map_or("all items".into(), |n| {
        format!("first {n} items of each set")
    });
    let names = cols.iter().map(swatch).collect::<Vec<_>>().join(", ");
    let mut o = format!("<h1>Unlearning evaluation: TOFU {split}</h1>\n<p>Split <b>{split}</b> \u{b7} {limit} \u{b7} sides: {names}</p>\n");
    match &r.settings {
        Value::Object(m) if !m.is_empty() => {
            o += "<table>\n";
            for (k, v) in m {
                let (k, v) = (esc(k), esc(&plain(v)));
                o += &format!("<tr><th>{k}</th><td>{v}</td></tr>\n");
            }
            o += "</table>\n";
        }
        Value::Null => {}
        v => o += &format!("<pre>{}</pre>\n", esc(&pretty(v))),
    }
    o
}

fn metric_table(cols: &[Col]) -> String {
    let mut o = String::from("<div class=\"wrap\"><table>\n<tr><th>Metric</th>");
    for c in cols {
        let cls = if c.is_ref { " class=\"ref\"" } else { "" };
        o += &format!("<th{cls}>{}</th>", swatch(c));
    }
    o += "</tr>\n";
    let mut rows = metrics();
    rows.push(Metric {
        label: "Seconds",
        note: "wall time of the evaluation",
        get: |s| Some(s.seconds),
    });
    for Metric { label, note, get } in rows {
        let vals: Vec<Option<f64>> = cols.iter().map(|c| get(c.side)).collect();
        if vals.iter().all(Option::is_none) {
            continue;
        }
        let (label, note) = (esc(label), esc(note));
        o += &format!("<tr><td>{label}<div class=\"note\">{note}</div></td>");
        for (c, v) in cols.iter().zip(vals) {
            let cls = if c.is_ref { "num ref" } else { "num" };
            let v = v.map_or("\u{2013}".into(), fmt_num);
            o += &format!("<td class=\"{cls}\">{v}</td>");
        }
        o += "</tr>\n";
    }
    o + "</table></div>\n"
}

/// The metric table with a row per side (for many sides).
fn metric_rows(cols: &[Col]) -> String {
    let mut rows = metrics();
    rows.push(Metric {
        label: "Seconds",
        note: "wall time of the evaluation",
        get: |s| Some(s.seconds),
    });
    rows.retain(|m| cols.iter().any(|c| (m.get)(c.side).is_some()));
    let mut o = String::from("<div class=\"wrap\"><table>\n<tr><th>Side</th>");
    for m in &rows {
        o += &format!("<th>{}</th>", esc(m.label));
    }
    o += "</tr>\n";
    for c in cols {
        let cls = if c.is_ref { " class=\"ref\"" } else { "" };
        o += &format!("<tr{cls}><td>{}</td>", swatch(c));
        for m in &rows {
            let v = (m.get)(c.side).map_or("\u{2013}".into(), fmt_num);
            o += &format!("<td class=\"num\">{v}</td>");
        }
        o += "</tr>\n";
    }
    o + "</table></div>\n"
}

/// A scatter chart of forget quality (log10 axis, from the decade below the smallest value,
/// at least 1e-3 and at most 1e-20, to 1) against a utility (linear, 0 to a round number
/// above the largest): one dot per side that has both, the reference as a ring; a dot's label
/// is left out where it would overlap one already drawn (its tooltip keeps the name).
fn tradeoff(
    title: &str,
    x_name: &str,
    cols: &[Col],
    x_of: fn(&SideResult) -> Option<f64>,
) -> String {
    let t = esc(title);
    // The reference's forget quality against itself is 1 by definition.
    let pts: Vec<(&Col, f64, f64)> = cols
        .iter()
        .filter_map(|c| {
            let fq = c.side.forget_quality.or(c.is_ref.then_some(1.0))?;
            let x = x_of(c.side)?;
            (x.is_finite() && fq.is_finite()).then_some((c, x, fq))
        })
        .collect();
    if pts.is_empty() {
        let none = "<p class=\"muted\">No side has both numbers.</p>";
        return format!("<figure><figcaption>{t}</figcaption>{none}</figure>\n");
    }
    let x_top = pts.iter().fold(0f64, |m, p| m.max(p.1));
    let x_max = ((x_top * 10.0).ceil() / 10.0).max(0.1);
    let (left, top, pw, ph) = (52.0, 14.0, 420.0, 260.0);
    let (right, bottom) = (left + pw, top + ph);
    let width = right + 150.0;
    let h = bottom + 40.0;
    let x = |v: f64| left + pw * (v.clamp(0.0, x_max) / x_max);
    let lo = log_floor(pts.iter().map(|p| p.2));
    let y = |v: f64| bottom - ph * (1.0 - v.clamp(10f64.powi(lo), 1.0).log10() / f64::from(lo));
    let mut o = format!("<figure><figcaption>{t}</figcaption><svg role=\"img\" viewBox=\"0 0 {width} {h}\" width=\"{width}\" height=\"{h}\"><title>{t}</title>\n");
    let step = if lo >= -6 { 1 } else { 5 };
    for v in (lo / step..=0).map(|i| 10f64.powi(step * i)) {
        let (ty, tx, ly) = (y(v), left - 6.0, y(v) + 4.0);
        let s = if v < 1.0 {
            format!("{v:e}")
        } else {
            "1".into()
        };
        o += &format!("<line x1=\"{left}\" x2=\"{right}\" y1=\"{ty}\" y2=\"{ty}\" stroke=\"#ececec\"/><text x=\"{tx}\" y=\"{ly}\" text-anchor=\"end\" fill=\"#666\">{s}</text>\n");
    }
    for i in 0..=5 {
        let v = x_max * f64::from(i) / 5.0;
        let (tx, ty) = (x(v), bottom + 14.0);
        o += &format!("<line x1=\"{tx}\" x2=\"{tx}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"#f3f3f3\"/><text x=\"{tx}\" y=\"{ty}\" text-anchor=\"middle\" fill=\"#666\">{:.2}</text>\n", v);
    }
    let (gy, gx) = (y(0.05), right + 4.0);
    o += &format!("<line x1=\"{left}\" x2=\"{right}\" y1=\"{gy}\" y2=\"{gy}\" stroke=\"#c0392b\" stroke-dasharray=\"5 4\"/><text x=\"{gx}\" y=\"{}\" fill=\"#c0392b\" font-size=\"10\">p = 0.05</text>\n", gy + 4.0);
    // Labels go on from the top down; one that would overlap a drawn one is left out.
    let mut order: Vec<usize> = (0..pts.len()).collect();
    order.sort_by(|&a, &b| {
        let key = |i: usize| (!pts[i].0.is_ref, pts[i].0.side.name.contains('='));
        key(a).cmp(&key(b)).then(pts[b].2.total_cmp(&pts[a].2))
    });
    let mut placed: Vec<(f64, f64, f64)> = Vec::new(); // (x, y, width) of drawn labels
    for i in order {
        let (c, xv, fq) = &pts[i];
        let (cx, cy) = (x(*xv), y(*fq));
        let (who, label) = (esc(&c.label), esc(&c.side.name));
        let (xs, fs) = (fmt_num(*xv), fmt_num(*fq));
        let dot = if c.is_ref {
            format!("<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"5\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\">", c.colour)
        } else {
            format!(
                "<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"4\" fill=\"{}\">",
                c.colour
            )
        };
        o += &format!(
            "{dot}<title>{who}: forget quality {fs}, {} {xs}</title></circle>\n",
            esc(x_name)
        );
        let (lx, ly, lw) = (cx + 6.0, cy + 3.0, 5.0 * c.side.name.chars().count() as f64);
        let clear = placed
            .iter()
            .all(|&(px, py, pw)| (ly - py).abs() >= 10.0 || lx + lw <= px || px + pw <= lx);
        if clear {
            placed.push((lx, ly, lw));
            o += &format!(
                "<text x=\"{lx:.1}\" y=\"{ly:.1}\" font-size=\"9\" fill=\"#444\">{label}</text>\n"
            );
        }
    }
    let (mx, my, xn) = (left + pw / 2.0, bottom + 32.0, esc(x_name));
    o += &format!("<text x=\"{mx}\" y=\"{my}\" text-anchor=\"middle\">{xn}</text><text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">forget quality</text>\n", top + ph / 2.0, top + ph / 2.0);
    o += &format!("<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"#999\"/><line x1=\"{left}\" x2=\"{right}\" y1=\"{bottom}\" y2=\"{bottom}\" stroke=\"#999\"/>\n");
    o + "</svg></figure>\n"
}

/// A chart: its title, the metrics (labels of [`metrics`]) grouped on the x axis, whether
/// the axis is log10, a dashed guide line and its label.
type ChartSpec = (
    &'static str,
    &'static [&'static str],
    bool,
    Option<(f64, &'static str)>,
);

const CHARTS: [ChartSpec; 4] = [
    (
        "Forget set: ROUGE-L, probability and truth ratio",
        &["Forget ROUGE-L", "Forget probability", "Forget truth ratio"],
        false,
        None,
    ),
    (
        "Retained knowledge: ROUGE-L per set and model utility",
        &[
            "Retain ROUGE-L",
            "Real authors ROUGE-L",
            "World facts ROUGE-L",
            "Model utility",
        ],
        false,
        None,
    ),
    (
        "Forget quality (KS p-value vs reference, log scale)",
        &["Forget quality"],
        true,
        Some((0.05, "p = 0.05")),
    ),
    (
        "Membership inference AUC, forget vs holdout",
        &[
            "MIA AUC: LOSS",
            "MIA AUC: zlib",
            "MIA AUC: Min-K%",
            "MIA AUC: Min-K%++",
        ],
        false,
        Some((0.5, "0.5 = chance")),
    ),
];

fn charts(cols: &[Col]) -> String {
    let series: Vec<(String, &str)> = cols.iter().map(|c| (c.label.clone(), c.colour)).collect();
    let all = metrics();
    let values = |label: &str| -> Vec<Option<f64>> {
        let m = all.iter().find(|m| m.label == label);
        cols.iter()
            .map(|c| m.and_then(|m| (m.get)(c.side)))
            .collect()
    };
    let mut o = String::new();
    for (title, labels, log, guide) in CHARTS {
        let groups: Vec<(String, Vec<Option<f64>>)> = labels
            .iter()
            .map(|l| (l.trim_start_matches("MIA AUC: ").to_string(), values(l)))
            .collect();
        o += &bar_chart(title, &groups, &series, 1.0, log, guide);
    }
    o
}

/// The bottom of a forget-quality axis: the exponent of the decade at or below the smallest
/// value, between -20 and -3 (a multiple of 5 below -6).
fn log_floor(vals: impl Iterator<Item = f64>) -> i32 {
    let min = vals.filter(|v| *v > 0.0).fold(1.0f64, f64::min);
    let e = (min.max(LOG_MIN).log10().floor() as i32).min(-3);
    if e >= -6 {
        e
    } else {
        e.div_euclid(5) * 5
    }
}

/// Where `v` falls on the axis, 0 (bottom) to 1 (top), clamped.
fn frac(v: f64, y_max: f64, log: bool) -> f64 {
    if log {
        1.0 - v.clamp(LOG_MIN, 1.0).log10() / LOG_MIN.log10()
    } else {
        v.clamp(0.0, y_max) / y_max
    }
}

/// A grouped bar chart: one group per `(label, value per series)`, one bar per series in its
/// colour; a linear axis from 0 to `y_max`, or with `log` a log10 axis from 1e-20 to 1. Bars
/// are clamped to the axis, their value labels are not. `guide` draws a dashed line.
fn bar_chart(
    title: &str,
    groups: &[(String, Vec<Option<f64>>)],
    series: &[(String, &str)],
    y_max: f64,
    log: bool,
    guide: Option<(f64, &str)>,
) -> String {
    let t = esc(title);
    let finite = |v: &Option<f64>| v.filter(|x| x.is_finite());
    if groups
        .iter()
        .all(|(_, v)| v.iter().all(|x| finite(x).is_none()))
    {
        let none = "<p class=\"muted\">No data.</p>";
        return format!("<figure><figcaption>{t}</figcaption>{none}</figure>\n");
    }
    let (bw, left, top, ph) = (38.0, 52.0, 14.0, 200.0);
    let longest = groups
        .iter()
        .map(|g| g.0.chars().count())
        .max()
        .unwrap_or(0);
    let gw = (series.len() as f64 * bw + 28.0).max(6.5 * longest as f64 + 12.0);
    // The plot spans left..right; a guide's label goes right of it.
    let gw = gw.max((320.0 - left) / groups.len() as f64);
    let right = left + groups.len() as f64 * gw;
    let width = right + if guide.is_some() { 84.0 } else { 12.0 };
    let bottom = top + ph;
    let y = |v: f64| bottom - ph * frac(v, y_max, log);
    // The legend, wrapped to the width.
    let (mut lx, mut ly, mut legend) = (left, bottom + 42.0, String::new());
    for (name, colour) in series {
        let w = 24.0 + 6.5 * name.chars().count() as f64;
        if lx + w > width && lx > left {
            (lx, ly) = (left, ly + 18.0);
        }
        let (ry, tx, name) = (ly - 10.0, lx + 16.0, esc(name));
        legend += &format!("<rect x=\"{lx}\" y=\"{ry}\" width=\"12\" height=\"12\" rx=\"2\" fill=\"{colour}\"/><text x=\"{tx}\" y=\"{ly}\">{name}</text>\n");
        lx += w;
    }
    let h = ly + 10.0;
    let mut o = format!("<figure><figcaption>{t}</figcaption><svg role=\"img\" viewBox=\"0 0 {width} {h}\" width=\"{width}\" height=\"{h}\"><title>{t}</title>\n");
    let ticks: Vec<f64> = match log {
        true => (-4..=0).map(|i| 10f64.powi(5 * i)).collect(),
        false => (0..=5).map(|i| y_max * f64::from(i) / 5.0).collect(),
    };
    for v in ticks {
        let (ty, tx, ly) = (y(v), left - 6.0, y(v) + 4.0);
        let s = if log && v < 1.0 {
            format!("{v:e}")
        } else {
            format!("{}", (v * 100.0).round() / 100.0)
        };
        o += &format!("<line x1=\"{left}\" x2=\"{right}\" y1=\"{ty}\" y2=\"{ty}\" stroke=\"#ececec\"/><text x=\"{tx}\" y=\"{ly}\" text-anchor=\"end\" fill=\"#666\">{s}</text>\n");
    }
    for (g, (name, vals)) in groups.iter().enumerate() {
        let gx = left + g as f64 * gw;
        let mut x = gx + (gw - series.len() as f64 * bw) / 2.0 + 2.0;
        for ((who, colour), v) in series.iter().zip(vals) {
            let (bar, cx) = (bw - 4.0, x + bw / 2.0 - 2.0);
            if let Some(v) = finite(v) {
                let (by, ty) = (y(v), y(v) - 3.0);
                let bh = bottom - by;
                let (who, what, exact) = (esc(who), esc(name), fmt_num(v));
                let shown = if log {
                    format!("{v:.1e}")
                } else {
                    format!("{v:.3}")
                };
                o += &format!("<rect x=\"{x}\" y=\"{by:.1}\" width=\"{bar}\" height=\"{bh:.1}\" fill=\"{colour}\"><title>{who}: {what} = {exact}</title></rect><text x=\"{cx}\" y=\"{ty:.1}\" text-anchor=\"middle\" font-size=\"10\">{shown}</text>\n");
            } else {
                let ty = bottom - 3.0;
                o += &format!("<text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\" font-size=\"10\" fill=\"#aaa\">n/a</text>\n");
            }
            x += bw;
        }
        let (cx, ty, name) = (gx + gw / 2.0, bottom + 16.0, esc(name));
        o += &format!("<text x=\"{cx}\" y=\"{ty}\" text-anchor=\"middle\">{name}</text>\n");
    }
    if let Some((g, s)) = guide {
        let (gy, tx, ty, s) = (y(g), right + 4.0, y(g) + 4.0, esc(s));
        o += &format!("<line x1=\"{left}\" x2=\"{right}\" y1=\"{gy}\" y2=\"{gy}\" stroke=\"#c0392b\" stroke-dasharray=\"5 4\"/><text x=\"{tx}\" y=\"{ty}\" fill=\"#c0392b\" font-size=\"10\">{s}</text>\n");
    }
    o += &format!("<line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{bottom}\" stroke=\"#999\"/><line x1=\"{left}\" x2=\"{right}\" y1=\"{bottom}\" y2=\"{bottom}\" stroke=\"#999\"/>\n");
    o + &legend + "</svg></figure>\n"
}

/// The questions of one set (the first `max`), every side's answer beside the expected one.
fn answers(title: &str, cols: &[Col], kind: SetKind, max: usize) -> String {
    let sets: Vec<_> = cols.iter().map(|c| c.side.set(kind)).collect();
    let Some(base) = sets.iter().flatten().find(|s| !s.items.is_empty()) else {
        return String::new();
    };
    let title = esc(title);
    let mut o = format!("<h3>{title}</h3>\n<div class=\"wrap\"><table class=\"answers\">\n<tr><th class=\"n\">#</th><th>Question</th><th>Expected answer</th>");
    for c in cols {
        o += &format!("<th>{}</th>", swatch(c));
    }
    o += "</tr>\n";
    for (i, item) in base.items.iter().take(max).enumerate() {
        let (n, q, a) = (i + 1, esc(&item.question), esc(&item.answer));
        o += &format!("<tr><td>{n}</td><td>{q}</td><td>{a}</td>");
        for set in &sets {
            // The same question: at the same index when the sets line up.
            let same = |it: &&ItemResult| it.question == item.question;
            let got = set.and_then(|s| {
                s.items
                    .get(i)
                    .filter(same)
                    .or_else(|| s.items.iter().find(same))
            });
            o += &answer_cell(got);
        }
        o += "</tr>\n";
    }
    o + "</table></div>\n"
}

/// A side's answer with its ROUGE-L recall and the probability of the expected answer.
fn answer_cell(it: Option<&ItemResult>) -> String {
    let Some(it) = it else {
        return "<td class=\"muted\">\u{2013}</td>".into();
    };
    let text = it
        .generated
        .as_deref()
        .map_or("<span class=\"muted\">not generated</span>".into(), esc);
    let rouge = it
        .rouge_l_recall
        .map_or("\u{2013}".into(), |r| format!("{r:.3}"));
    let p = fmt_num((-it.gt_loss).exp());
    format!("<td>{text}<div class=\"score\">ROUGE-L {rouge} \u{b7} p {p}</div></td>")
}

/// Every object with a `sha256` anywhere in `v` (the files of an audit).
fn hashed<'a>(v: &'a Value, out: &mut Vec<&'a serde_json::Map<String, Value>>) {
    match v {
        Value::Object(m) => {
            if m.contains_key("sha256") {
                out.push(m);
            }
            m.values().for_each(|x| hashed(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| hashed(x, out)),
        _ => {}
    }
}

/// A side's settings: its profile, the hashed files in a table, the whole audit as JSON.
fn audit(c: &Col) -> String {
    let a = &c.side.audit;
    let mut o = format!("<h3>{}</h3>\n", swatch(c));
    if let Some(p) = a.get("profile").filter(|p| !p.is_null()) {
        o += &format!("<p>Profile <b>{}</b></p>\n", esc(&plain(p)));
    }
    let mut files = Vec::new();
    hashed(a, &mut files);
    if !files.is_empty() {
        o += "<div class=\"wrap\"><table>\n<tr><th>Role</th><th>Path</th><th>SHA-256</th></tr>\n";
        for f in files {
            let get = |k: &str| esc(&f.get(k).map_or(String::new(), plain));
            let (role, path, sha) = (get("role"), get("path"), get("sha256"));
            o += &format!(
                "<tr><td>{role}</td><td><code>{path}</code></td><td><code>{sha}</code></td></tr>\n"
            );
        }
        o += "</table></div>\n";
    }
    let json = esc(&pretty(a));
    o + &format!(
        "<details><summary>Settings and files (JSON)</summary><pre>{json}</pre></details>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::run::{MiaAuc, SetResult};
    use crate::eval::tofu::SetSummary;
    use serde_json::json;

    fn item(q: &str, gen: Option<&str>) -> ItemResult {
        ItemResult {
            question: q.into(),
            answer: "She wrote \"Night\" & 'Day'".into(),
            generated: gen.map(Into::into),
            rouge_l_recall: gen.map(|_| 0.5),
            gt_loss: 0.7,
            gt_tokens: 6,
            paraphrased_loss: 0.9,
            perturbed_loss: vec![1.2, 1.5],
            mia: None,
        }
    }

    fn side(name: &str, hash: &str, full: bool) -> SideResult {
        let set = |name: &str, kind, gen: Option<&str>| SetResult {
            name: name.into(),
            kind,
            summary: SetSummary {
                probability: 0.6,
                rouge: 0.4,
                truth_ratio: 0.55,
            },
            items: vec![
                item("Who is <b>& the author?", gen),
                item("Where was she born?", gen),
            ],
        };
        let mut sets = vec![set(
            "forget",
            SetKind::Forget,
            full.then_some("a <i>guess</i>"),
        )];
        if full {
            sets.push(set("retain", SetKind::Retain, Some("Paris")));
            sets.push(set("real_authors", SetKind::RealAuthors, Some("x")));
            sets.push(set("world_facts", SetKind::WorldFacts, Some("y")));
        }
        SideResult {
            name: name.into(),
            audit: json!({
                "profile": name,
                "patches": [{ "file": "p.lpatch", "scale": 1.0 }],
                "assistants": [{ "kind": "uld", "alpha": 0.8, "filter": 0.1 }],
                "files": [{ "role": "model", "path": "/m/x.gguf", "sha256": hash }],
            }),
            sets,
            holdout: vec![],
            model_utility: full.then_some(0.52),
            scored_utility: full.then_some(0.58),
            forget_quality: full.then_some(3.2e-7),
            mia: full.then_some(MiaAuc {
                k: 0.2,
                loss: 0.71,
                zlib: 0.66,
                min_k: 0.69,
                min_k_pp: 0.5,
            }),
            seconds: 12.5,
        }
    }

    fn report() -> Report {
        Report {
            split: "forget01".into(),
            limit: Some(2),
            sides: vec![
                side("base", &"ab".repeat(32), true),
                side("forgot<ten>", &"cd".repeat(32), true),
            ],
            reference: Some(side("retain90", &"ef".repeat(32), false)),
            settings: json!({ "lethe": "0.1.0", "threads": 8, "server": null }),
        }
    }

    #[test]
    fn page() {
        let h = render(&report());
        assert!(h.starts_with("<!DOCTYPE html>"));
        for bad in ["http://", "https://", "<script", "<b>&", "<i>guess"] {
            assert!(!h.contains(bad), "{bad}");
        }
        for name in ["base", "forgot&lt;ten&gt;", "retain90 (reference)"] {
            assert!(h.contains(name), "{name}");
        }
        assert!(h.contains("Who is &lt;b&gt;&amp; the author?"));
        assert!(h.contains("She wrote &quot;Night&quot; &amp; &#39;Day&#39;"));
        // Four bar charts and the two forget-quality-against-utility scatters.
        assert_eq!(h.matches("<svg").count(), 6);
        assert_eq!(h.matches("<svg").count(), h.matches("</svg>").count());
        assert!(h.contains("Forget quality against model utility"));
        assert!(h.contains("forget quality 3.200e-7, model utility 0.5200"));
        assert!(h.contains("forget quality 3.200e-7, scored utility 0.5800"));
        for hash in ["ab", "cd", "ef"] {
            assert!(h.contains(&hash.repeat(32)));
        }
        assert!(h.contains("stroke-dasharray"));
        assert!(h.contains("3.200e-7") && !h.contains("NaN"));
    }

    /// Many sides (a sweep): a row per side, no bar charts, the scatters keep every point.
    #[test]
    fn many_sides() {
        let mut r = report();
        for i in 0..8 {
            let mut s = side(&format!("uld alpha={i}"), &"ab".repeat(32), true);
            s.forget_quality = Some(10f64.powi(-i));
            r.sides.push(s);
        }
        let h = render(&r);
        assert_eq!(h.matches("<svg").count(), 2);
        let both = r
            .sides
            .iter()
            .filter(|s| s.forget_quality.is_some() && s.model_utility.is_some())
            .count();
        assert!(both >= 9);
        assert_eq!(h.matches("<circle").count(), 2 * both);
        assert!(h.contains("<th>Forget quality</th>"));
        assert!(!h.contains("NaN"));
    }

    #[test]
    fn log_axis() {
        assert_eq!(frac(1.0, 1.0, true), 1.0);
        assert_eq!(frac(1e-10, 1.0, true), 0.5);
        assert_eq!(frac(0.0, 1.0, true), 0.0);
        assert_eq!(frac(2.0, 1.0, false), 1.0);
        let mut r = report();
        r.sides[1].forget_quality = Some(0.0);
        assert!(!render(&r).contains("NaN"));
    }

    #[test]
    fn forget_quality_axis_fits_the_data() {
        // At least three decades; one per decade down to 1e-6, multiples of 5 below.
        assert_eq!(log_floor([0.5, 0.02].into_iter()), -3);
        assert_eq!(log_floor([0.5, 2e-5].into_iter()), -5);
        assert_eq!(log_floor([1e-6].into_iter()), -6);
        assert_eq!(log_floor([3e-7].into_iter()), -10);
        assert_eq!(log_floor([1e-30, 0.0].into_iter()), -20);
        assert_eq!(log_floor(std::iter::empty()), -3);
    }

    #[test]
    fn escapes() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }

    #[test]
    fn empty_charts() {
        let mut r = report();
        r.sides.truncate(0);
        r.reference = None;
        let h = render(&r);
        assert!(h.contains("No data."));
        assert_eq!(h.matches("<svg").count(), 0);
    }
}
