//! Output of a bench run: a table on the terminal, `bench.json` and `bench.svg`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use plotters::{
    coord::{Shift, ranged1d::AsRangedCoord, ranged1d::ValueFormatter},
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::{Report, Stats, control::ControlReport, datapath::DatapathReport, e2e::E2eReport};

/// The whole report as aligned text tables, ending with the targets and whether each holds.
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let _ = writeln!(
        out,
        "\nxdplb bench{}  {}  commit {}",
        if report.quick { " (quick)" } else { "" },
        or_dash(&m.date),
        or_dash(&m.commit)
    );
    let _ = writeln!(
        out,
        "machine: {}, {} CPUs, {:.1} GiB, Linux {}",
        or_dash(&m.cpu_model),
        m.cpus,
        m.memory_gib,
        or_dash(&m.kernel)
    );
    if let Some(d) = &report.datapath {
        datapath_text(&mut out, d);
    }
    if let Some(c) = &report.control {
        control_text(&mut out, c);
    }
    if let Some(e) = &report.e2e {
        e2e_text(&mut out, e);
    }
    if let Some(f) = &report.failover {
        out.push_str(&super::failover::render_text(f));
    }

    let _ = writeln!(out, "\nTARGETS");
    if report.checks.is_empty() {
        let _ = writeln!(out, "  (none checked in this run)");
    }
    let mut t = Table::new(
        &["", "target", "", "measured"],
        &[false, false, false, false],
    );
    for c in &report.checks {
        t.row(vec![
            if c.holds { "ok" } else { "MISSED" }.to_string(),
            c.name.clone(),
            c.target.clone(),
            c.measured.clone(),
        ]);
    }
    if !report.checks.is_empty() {
        out.push_str(&t.render_without_header());
        let missed = report.checks.iter().filter(|c| !c.holds).count();
        let _ = writeln!(
            out,
            "  {} of {} targets hold",
            report.checks.len() - missed,
            report.checks.len()
        );
    }

    let control_notes = report.control.iter().flat_map(|c| &c.notes);
    if !report.notes.is_empty() || report.control.as_ref().is_some_and(|c| !c.notes.is_empty()) {
        let _ = writeln!(out, "\nNOTES");
        for (k, v) in &report.notes {
            let _ = writeln!(out, "  {k}: {v}");
        }
        for n in control_notes {
            let _ = writeln!(out, "  control: {n}");
        }
    }
    out
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn datapath_text(out: &mut String, d: &DatapathReport) {
    let _ = writeln!(
        out,
        "\nDATA PATH  BPF_PROG_TEST_RUN on CPU {}, {} rounds x {} packets; program: {} \
         instructions after verification, {} bytes JIT-ed",
        d.cpu, d.rounds, d.iterations, d.xlated_insns, d.jited_bytes
    );
    let mut t = Table::new(
        &[
            "config",
            "path",
            "ns/pkt min / median / max",
            "above floor, median (min..max)",
            "target",
            "action",
            "counter verified",
        ],
        &[false, false, true, true, true, false, false],
    );
    for c in &d.cases {
        t.row(vec![
            c.config.clone(),
            c.path.clone(),
            c.ns.show(1),
            format!(
                "{:.1} ({:.1}..{:.1})",
                c.above_floor.median, c.above_floor.min, c.above_floor.max
            ),
            c.target_ns.map_or("-".into(), |t| format!("<= {t:.0} ns")),
            c.action.clone(),
            if c.counter.is_empty() {
                "-".into()
            } else {
                c.counter.clone()
            },
        ]);
    }
    out.push_str(&t.render());
}

fn control_text(out: &mut String, c: &ControlReport) {
    let _ = writeln!(
        out,
        "\nCONTROL PLANE  Maglev tables of N equal-weight backends at size M, {} rounds",
        c.rounds
    );
    let mut t = Table::new(
        &[
            "N",
            "M",
            "build ms min / median / max",
            "peak heap",
            "in kernel",
            "balance max dev",
            "1 removed: moved (ideal)",
            "1 added: moved (ideal)",
        ],
        &[true, true, true, true, true, true, true, true],
    );
    for r in &c.maglev {
        t.row(vec![
            r.backends.to_string(),
            r.table_size.to_string(),
            r.build_ms.show(2),
            if c.memory_measured {
                bytes(r.build_peak_bytes)
            } else {
                "n/a".into()
            },
            bytes(r.kernel_bytes),
            format!("{:.3}%", r.balance_max_dev_pct),
            format!("{:.3}% ({:.3}%)", r.remove_moved_pct, r.remove_ideal_pct),
            format!("{:.3}% ({:.3}%)", r.add_moved_pct, r.add_ideal_pct),
        ]);
    }
    out.push_str(&t.render());

    if !c.changes.is_empty() {
        let _ = writeln!(
            out,
            "\n  Change to live in the kernel (reconciler on a loaded data path, read back from \
             the maps)"
        );
        let mut t = Table::new(
            &["config", "change", "VIPs rebuilt", "ms min / median / max"],
            &[false, false, true, true],
        );
        for r in &c.changes {
            t.row(vec![
                r.config.clone(),
                r.change.clone(),
                r.vips_rebuilt.to_string(),
                r.latency_ms.show(2),
            ]);
        }
        out.push_str(&t.render());
    }
}

fn e2e_text(out: &mut String, e: &E2eReport) {
    let _ = writeln!(
        out,
        "\nEND TO END  client -> load balancer -> 3 backends; {} rounds x {} s, {} concurrent \
         connections",
        e.rounds, e.seconds, e.concurrency
    );
    if !e.setup.is_empty() {
        let _ = writeln!(out, "  setup: {}", e.setup);
    }
    let mut t = Table::new(
        &[
            "peer",
            "conn/s min / median / max",
            "errors",
            "RTT p50 us",
            "RTT p99 us",
            "UDP pps delivered / sent",
        ],
        &[false, true, true, true, true, true],
    );
    for p in &e.peers {
        t.row(vec![
            p.peer.clone(),
            p.cps.show(0),
            p.cps_errors.to_string(),
            format!("{:.1}", p.rtt_p50_us.median),
            format!("{:.1}", p.rtt_p99_us.median),
            match (&p.udp_pps, &p.udp_sent_pps) {
                (Some(d), Some(s)) => format!("{:.0} / {:.0}", d.median, s.median),
                (Some(d), None) => format!("{:.0} / -", d.median),
                _ => "n/a".into(),
            },
        ]);
    }
    out.push_str(&t.render());
    let _ = writeln!(
        out,
        "  (RTT and UDP: median over the rounds of each round's figure)"
    );

    let _ = writeln!(out, "\n  Connections per backend");
    for p in &e.peers {
        let total: u64 = p.split.values().sum();
        let split: Vec<String> = p
            .split
            .iter()
            .map(|(b, n)| format!("{b} {n} ({:.1}%)", pct(*n, total)))
            .collect();
        let _ = writeln!(
            out,
            "  {:<w$}  {}",
            p.peer,
            if split.is_empty() {
                "-".to_string()
            } else {
                split.join("  ")
            },
            w = e.peers.iter().map(|p| p.peer.len()).max().unwrap_or(0)
        );
    }

    let _ = writeln!(out, "\n  Ratios, per round (min / median / max)");
    let ratios = [
        ("xdplb conn/s / nftables DNAT conn/s", &e.cps_vs_nftables),
        ("xdplb conn/s / HAProxy conn/s", &e.cps_vs_haproxy),
        ("xdplb RTT p50 / direct RTT p50", &e.rtt_p50_vs_direct),
        (
            "xdplb RTT p50 / XDP forwarder floor RTT p50",
            &e.rtt_p50_vs_forwarder,
        ),
        (
            "XDP forwarder floor RTT p50 / direct RTT p50",
            &e.forwarder_rtt_p50_vs_direct,
        ),
    ];
    for (name, s) in ratios {
        let _ = writeln!(out, "  {name:<38} {}", stats_or_na(s, 2));
    }
    let _ = writeln!(
        out,
        "  {:<38} {}",
        "xdplb program, ns/packet (bpf_stats)",
        stats_or_na(&e.xdp_ns_per_packet, 1)
    );
    let _ = writeln!(
        out,
        "  {:<38} {}",
        "forwarder floor, ns/packet (bpf_stats)",
        stats_or_na(&e.forwarder_ns_per_packet, 1)
    );

    for p in e.peers.iter().filter(|p| !p.cps_error_kinds.is_empty()) {
        let kinds: Vec<String> = p
            .cps_error_kinds
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        let _ = writeln!(out, "  errors, {}: {}", p.peer, kinds.join(", "));
    }
    for p in e.peers.iter().filter(|p| !p.note.is_empty()) {
        let _ = writeln!(out, "  note, {}: {}", p.peer, p.note);
    }
}

fn stats_or_na(s: &Stats, digits: usize) -> String {
    if s.samples.is_empty() {
        "n/a".into()
    } else {
        s.show(digits)
    }
}

fn pct(n: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        n as f64 * 100.0 / total as f64
    }
}

fn bytes(b: u64) -> String {
    const KIB: f64 = 1024.0;
    let f = b as f64;
    if f >= KIB * KIB {
        format!("{:.2} MiB", f / KIB / KIB)
    } else if f >= KIB {
        format!("{:.1} KiB", f / KIB)
    } else {
        format!("{b} B")
    }
}

/// Columns padded to their widest cell; numbers right-aligned.
struct Table {
    header: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str], right: &[bool]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            right: right.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn widths(&self, with_header: bool) -> Vec<usize> {
        let mut w: Vec<usize> = if with_header {
            self.header.iter().map(|h| h.chars().count()).collect()
        } else {
            vec![0; self.header.len()]
        };
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if i < w.len() {
                    w[i] = w[i].max(c.chars().count());
                }
            }
        }
        w
    }

    fn line(&self, cells: &[String], widths: &[usize]) -> String {
        let mut s = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            let pad = w.saturating_sub(c.chars().count());
            s.push(' ');
            if self.right.get(i).copied().unwrap_or(false) {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            }
            s.push(' ');
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    }

    fn render(&self) -> String {
        let w = self.widths(true);
        let mut s = self.line(&self.header, &w);
        let rule: Vec<String> = w.iter().map(|&n| "-".repeat(n)).collect();
        s.push_str(&self.line(&rule, &w));
        for r in &self.rows {
            s.push_str(&self.line(r, &w));
        }
        s
    }

    fn render_without_header(&self) -> String {
        let w = self.widths(false);
        self.rows.iter().map(|r| self.line(r, &w)).collect()
    }
}

/// Writes `bench.json` and `bench.svg` into `dir` (created if missing); returns their paths.
pub fn write_files(report: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("bench.json");
    let text = serde_json::to_string_pretty(report).context("serialising the report")?;
    std::fs::write(&json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
    let svg = dir.join("bench.svg");
    std::fs::write(&svg, render_svg(report)?)
        .with_context(|| format!("writing {}", svg.display()))?;
    Ok(vec![json, svg])
}

// ---------------------------------------------------------------------------------------------
// The chart

const WIDTH: u32 = 1400;
const HEADER_H: u32 = 56;
const ROW_H: u32 = 26;
const FONT: &str = "sans-serif";

const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const GREY: RGBColor = RGBColor(150, 150, 150);
const TARGET: RGBColor = RGBColor(214, 39, 40);

/// One horizontal bar: the median, with a min..max whisker.
struct Bar {
    label: String,
    stats: Stats,
    color: RGBColor,
    /// A target on this bar's scale, drawn as a red tick across the bar.
    target: Option<f64>,
}

/// A panel of horizontal bars, one per row, top to bottom.
struct Panel {
    title: String,
    x_desc: String,
    bars: Vec<Bar>,
    /// Vertical reference lines (value, label), e.g. the floor programs.
    lines: Vec<(f64, String)>,
    /// Pixels for the row labels left of the bars.
    label_w: u32,
    digits: usize,
}

impl Panel {
    fn height(&self) -> u32 {
        110 + ROW_H * self.bars.len().max(1) as u32
    }

    fn hi(&self) -> f64 {
        let bars = self
            .bars
            .iter()
            .flat_map(|b| [b.stats.max, b.target.unwrap_or(0.0)]);
        let lines = self.lines.iter().map(|l| l.0);
        bars.chain(lines).fold(0.0, f64::max)
    }

    fn lo_positive(&self) -> f64 {
        self.bars
            .iter()
            .map(|b| b.stats.min)
            .filter(|&v| v > 0.0)
            .fold(f64::INFINITY, f64::min)
    }

    /// Spans of more than two decades on a linear axis make the small bars invisible.
    fn wants_log(&self) -> bool {
        let lo = self.lo_positive();
        lo.is_finite() && self.hi() / lo > 100.0
    }
}

fn render_svg(report: &Report) -> Result<String> {
    let mut rows: Vec<Vec<Panel>> = Vec::new();
    if let Some(d) = &report.datapath
        && !d.cases.is_empty()
    {
        rows.push(vec![datapath_panel(d)]);
    }
    if let Some(e) = &report.e2e
        && !e.peers.is_empty()
    {
        rows.push(e2e_panels(e));
    }
    if let Some(c) = &report.control {
        rows.extend(control_panels(c).into_iter().filter(|r| !r.is_empty()));
    }
    let heights: Vec<u32> = rows
        .iter()
        .map(|r| r.iter().map(Panel::height).max().unwrap_or(0))
        .collect();
    let total_h = HEADER_H + heights.iter().sum::<u32>() + 10;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, total_h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let m = &report.machine;
        root.draw(&Text::new(
            format!(
                "xdplb bench{}  {}  commit {}",
                if report.quick { " (quick)" } else { "" },
                or_dash(&m.date),
                or_dash(&m.commit)
            ),
            (14, 10),
            (FONT, 20).into_font().style(FontStyle::Bold),
        ))
        .map_err(plot_err)?;
        let held = report.checks.iter().filter(|c| c.holds).count();
        root.draw(&Text::new(
            format!(
                "{}, {} CPUs, Linux {}.  Targets: {held} of {} hold{}",
                or_dash(&m.cpu_model),
                m.cpus,
                or_dash(&m.kernel),
                report.checks.len(),
                missed_names(report)
            ),
            (14, 34),
            (FONT, 13).into_font(),
        ))
        .map_err(plot_err)?;

        let (_, mut rest) = root.split_vertically(HEADER_H);
        for (panels, h) in rows.iter().zip(&heights) {
            let (this, below) = rest.split_vertically(*h);
            rest = below;
            let areas = this.split_evenly((1, panels.len()));
            for (panel, area) in panels.iter().zip(&areas) {
                draw_panel(&root, area, panel)?;
            }
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn missed_names(report: &Report) -> String {
    let missed: Vec<&str> = report
        .checks
        .iter()
        .filter(|c| !c.holds)
        .map(|c| c.name.as_str())
        .collect();
    if missed.is_empty() {
        String::new()
    } else {
        format!("; missed: {}", missed.join("; "))
    }
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e:?}")
}

fn draw_panel(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    panel: &Panel,
) -> Result<()> {
    let area = area.margin(6, 6, 10, 14);
    if panel.wants_log() {
        // The bars grow from a power of ten below the smallest value; room on the right for
        // the value labels.
        let lo = 10f64.powf((panel.lo_positive() * 0.5).log10().floor());
        let hi = panel.hi() * 2.5;
        draw_bars(root, &area, panel, (lo..hi).log_scale(), lo)
    } else {
        let hi = if panel.hi() > 0.0 {
            panel.hi() * 1.15
        } else {
            1.0
        };
        draw_bars(root, &area, panel, 0.0..hi, 0.0)
    }
}

/// Draws `panel` on `area` with the x axis `x` (linear or log), bars starting at `base`. Row
/// labels are placed by hand so that they sit at the middle of each bar whatever the axis picks
/// as ticks.
fn draw_bars<X>(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    panel: &Panel,
    x: X,
    base: f64,
) -> Result<()>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
{
    let n = panel.bars.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 15).into_font().style(FontStyle::Bold))
        .x_label_area_size(40)
        .y_label_area_size(panel.label_w)
        .build_cartesian_2d(x, 0f64..n)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(0)
        .x_labels(8)
        .x_label_formatter(&axis_number)
        .x_desc(panel.x_desc.as_str())
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 13))
        .draw()
        .map_err(plot_err)?;

    for (i, (v, label)) in panel.lines.iter().enumerate() {
        chart
            .draw_series(LineSeries::new([(*v, 0.0), (*v, n)], GREY.stroke_width(1)))
            .map_err(plot_err)?;
        let (px, py) = chart.backend_coord(&(*v, n));
        // One text line per reference line: floors a few ns apart would overprint.
        root.draw(&Text::new(
            label.clone(),
            (px + 3, py + 2 + 12 * i as i32),
            (FONT, 11).into_font().color(&GREY),
        ))
        .map_err(plot_err)?;
    }

    let len = panel.bars.len();
    for (i, b) in panel.bars.iter().enumerate() {
        // Row 0 at the top.
        let y = (len - 1 - i) as f64;
        let s = &b.stats;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(base, y + 0.2), (s.median.max(base), y + 0.8)],
                b.color.mix(0.85).filled(),
            )))
            .map_err(plot_err)?;
        if s.samples.len() > 1 {
            chart
                .draw_series(std::iter::once(ErrorBar::new_horizontal(
                    y + 0.5,
                    s.min.max(base),
                    s.median.max(base),
                    s.max.max(base),
                    BLACK.stroke_width(1),
                    8,
                )))
                .map_err(plot_err)?;
        }
        if let Some(t) = b.target {
            chart
                .draw_series(LineSeries::new(
                    [(t, y + 0.05), (t, y + 0.95)],
                    TARGET.stroke_width(3),
                ))
                .map_err(plot_err)?;
        }
        let (left, mid) = chart.backend_coord(&(base, y + 0.5));
        root.draw(&Text::new(
            b.label.clone(),
            (left - 6, mid),
            TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Right, VPos::Center)),
        ))
        .map_err(plot_err)?;
        let right_end = s.max.max(s.median).max(b.target.unwrap_or(base)).max(base);
        let (right, _) = chart.backend_coord(&(right_end, y + 0.5));
        root.draw(&Text::new(
            format!("{:.d$}", s.median, d = panel.digits),
            (right + 6, mid),
            TextStyle::from((FONT, 11).into_font()).pos(Pos::new(HPos::Left, VPos::Center)),
        ))
        .map_err(plot_err)?;
    }
    Ok(())
}

/// Axis ticks without trailing zeros, thousands as k and millions as M.
fn axis_number(v: &f64) -> String {
    let a = v.abs();
    let (v, suffix) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e4 {
        (v / 1e3, "k")
    } else {
        (*v, "")
    };
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{suffix}")
}

fn label_width(labels: impl Iterator<Item = usize>) -> u32 {
    // About 6 px per character at 12 px sans-serif.
    (labels.max().unwrap_or(0) as f64 * 6.0) as u32 + 16
}

fn datapath_panel(d: &DatapathReport) -> Panel {
    // Distinct configs in order of appearance get distinct colours; floors are grey.
    let mut configs: Vec<&str> = Vec::new();
    for c in &d.cases {
        if c.config != "floor" && !configs.contains(&c.config.as_str()) {
            configs.push(&c.config);
        }
    }
    let palette = [BLUE, ORANGE, GREEN, PURPLE];
    let bars: Vec<Bar> = d
        .cases
        .iter()
        .map(|c| Bar {
            label: format!("{}: {}", c.config, c.path),
            stats: c.ns.clone(),
            color: configs
                .iter()
                .position(|&k| k == c.config)
                .map_or(GREY, |i| palette[i % palette.len()]),
            // The target is on the cost above the floor; on this axis it sits at that case's
            // floor plus the target.
            target: c.target_ns.map(|t| c.ns.median - c.above_floor.median + t),
        })
        .collect();
    let lines = d
        .cases
        .iter()
        .filter(|c| c.config == "floor")
        .map(|c| (c.ns.median, format!("floor: {}", c.path)))
        .collect();
    Panel {
        title: format!(
            "Data path: ns per packet (BPF_PROG_TEST_RUN, median of {} rounds, whisker min..max; \
             red = target, grey = floor programs)",
            d.rounds
        ),
        x_desc: "ns per packet".into(),
        label_w: label_width(bars.iter().map(|b| b.label.chars().count())),
        bars,
        lines,
        digits: 1,
    }
}

fn e2e_panels(e: &E2eReport) -> Vec<Panel> {
    let color = |peer: &str| if peer == "xdplb" { BLUE } else { GREY };
    let label_w = label_width(e.peers.iter().map(|p| p.peer.chars().count()));
    let mut panels = vec![
        Panel {
            title: format!("End to end: TCP connections/s ({} rounds)", e.rounds),
            x_desc: "connections per second".into(),
            bars: e
                .peers
                .iter()
                .map(|p| Bar {
                    label: p.peer.clone(),
                    stats: p.cps.clone(),
                    color: color(&p.peer),
                    target: None,
                })
                .collect(),
            lines: Vec::new(),
            label_w,
            digits: 0,
        },
        Panel {
            title: "Request/response RTT p50 (low load)".into(),
            x_desc: "microseconds".into(),
            bars: e
                .peers
                .iter()
                .map(|p| Bar {
                    label: p.peer.clone(),
                    stats: p.rtt_p50_us.clone(),
                    color: color(&p.peer),
                    target: None,
                })
                .collect(),
            lines: Vec::new(),
            label_w,
            digits: 1,
        },
    ];
    let udp: Vec<Bar> = e
        .peers
        .iter()
        .filter_map(|p| {
            p.udp_pps.as_ref().map(|s| Bar {
                label: p.peer.clone(),
                stats: s.clone(),
                color: color(&p.peer),
                target: None,
            })
        })
        .collect();
    if !udp.is_empty() {
        panels.push(Panel {
            title: "UDP datagrams/s delivered to the backends".into(),
            x_desc: "datagrams per second".into(),
            bars: udp,
            lines: Vec::new(),
            label_w,
            digits: 0,
        });
    }
    panels
}

/// Two rows: the Maglev figures side by side, then the change latencies, whose long labels
/// need the whole width.
fn control_panels(c: &ControlReport) -> [Vec<Panel>; 2] {
    let mut panels = Vec::new();
    if !c.maglev.is_empty() {
        let bars: Vec<Bar> = c
            .maglev
            .iter()
            .map(|r| Bar {
                label: format!("N={} M={}", r.backends, r.table_size),
                stats: r.build_ms.clone(),
                color: if r.table_size <= 65537 { BLUE } else { PURPLE },
                target: (r.backends == 1000 && r.table_size == 65537).then_some(10.0),
            })
            .collect();
        panels.push(Panel {
            title: format!(
                "Maglev table build ({} rounds; red = 10 ms target)",
                c.rounds
            ),
            x_desc: "milliseconds".into(),
            label_w: label_width(bars.iter().map(|b| b.label.chars().count())),
            bars,
            lines: Vec::new(),
            digits: 2,
        });
        let bars: Vec<Bar> = c
            .maglev
            .iter()
            .map(|r| Bar {
                label: format!(
                    "N={} M={} (1/N = {}%)",
                    r.backends,
                    r.table_size,
                    axis_number(&r.remove_ideal_pct)
                ),
                stats: Stats::of(vec![r.remove_moved_pct]),
                color: if r.table_size <= 65537 { BLUE } else { PURPLE },
                target: Some(r.remove_ideal_pct + 1.0),
            })
            .collect();
        panels.push(Panel {
            title: "Maglev disruption: one backend removed (red = 1/N + 1% target)".into(),
            x_desc: "slots that changed backend, % of M".into(),
            label_w: label_width(bars.iter().map(|b| b.label.chars().count())),
            bars,
            lines: Vec::new(),
            digits: 3,
        });
    }
    let mut changes = Vec::new();
    if !c.changes.is_empty() {
        let bars: Vec<Bar> = c
            .changes
            .iter()
            .map(|r| Bar {
                label: format!("{}: {}", r.config, r.change),
                stats: r.latency_ms.clone(),
                color: BLUE,
                target: None,
            })
            .collect();
        changes.push(Panel {
            title: "Change to live in the kernel: reconciler on a loaded data path, read back \
                    from the maps (median, whisker min..max)"
                .into(),
            x_desc: "milliseconds".into(),
            label_w: label_width(bars.iter().map(|b| b.label.chars().count())),
            bars,
            lines: Vec::new(),
            digits: 2,
        });
    }
    [panels, changes]
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::bench::{
        Check, Machine,
        control::{ChangeRow, MaglevRow},
        datapath::PathCase,
        e2e::PeerResult,
    };

    fn case(
        config: &str,
        path: &str,
        ns: Vec<f64>,
        above: Vec<f64>,
        target: Option<f64>,
    ) -> PathCase {
        PathCase {
            config: config.into(),
            path: path.into(),
            program: "xdplb".into(),
            action: "XDP_TX".into(),
            counter: "forwarded".into(),
            ns: Stats::of(ns),
            above_floor: Stats::of(above),
            target_ns: target,
        }
    }

    fn peer(name: &str, cps: Vec<f64>, udp: Option<Vec<f64>>) -> PeerResult {
        PeerResult {
            peer: name.into(),
            cps: Stats::of(cps),
            cps_errors: 3,
            cps_error_kinds: BTreeMap::from([("connect: timed out".into(), 3)]),
            split: BTreeMap::from([("10.0.0.11".into(), 100), ("10.0.0.12".into(), 300)]),
            rtt_p50_us: Stats::of(vec![41.0, 43.0, 45.0]),
            rtt_p99_us: Stats::of(vec![90.0, 95.0, 99.0]),
            udp_sent_pps: udp
                .as_ref()
                .map(|u| Stats::of(u.iter().map(|v| v * 1.25).collect())),
            udp_pps: udp.map(Stats::of),
            note: String::new(),
        }
    }

    #[allow(
        clippy::needless_update,
        reason = "the e2e report is still growing; new fields take their defaults here"
    )]
    fn fake() -> Report {
        Report {
            machine: Machine {
                kernel: "6.18.0".into(),
                cpu_model: "Test CPU".into(),
                cpus: 2,
                memory_gib: 3.8,
                commit: "abc1234".into(),
                date: "2025-01-01T00:00:00Z".into(),
            },
            quick: true,
            datapath: Some(DatapathReport {
                cpu: 1,
                rounds: 3,
                iterations: 1000,
                xlated_insns: 1234,
                jited_bytes: 5678,
                cases: vec![
                    case(
                        "floor",
                        "return XDP_TX",
                        vec![20.0, 21.0, 22.0],
                        vec![0.0; 3],
                        None,
                    ),
                    case(
                        "1 VIP x 3 backends",
                        "TCP SYN, new flow",
                        vec![70.0, 73.5, 80.0],
                        vec![50.0, 52.5, 58.0],
                        Some(120.0),
                    ),
                ],
            }),
            control: Some(ControlReport {
                maglev: vec![MaglevRow {
                    backends: 1000,
                    table_size: 65537,
                    build_ms: Stats::of(vec![4.25, 4.5, 4.75]),
                    build_peak_bytes: 3 << 20,
                    kernel_bytes: 524296,
                    balance_max_dev_pct: 0.819,
                    remove_moved_pct: 0.645,
                    remove_ideal_pct: 0.1,
                    add_moved_pct: 0.55,
                    add_ideal_pct: 0.0999,
                }],
                changes: vec![ChangeRow {
                    config: "1 VIP x 3 backends, M=65537".into(),
                    change: "one backend's MAC lost".into(),
                    latency_ms: Stats::of(vec![0.9, 0.95, 1.0]),
                    vips_rebuilt: 1,
                    note: String::new(),
                }],
                rounds: 3,
                memory_measured: true,
                notes: vec!["a control note".into()],
            }),
            e2e: Some(E2eReport {
                rounds: 3,
                seconds: 2.0,
                concurrency: 16,
                peers: vec![
                    peer("xdplb", vec![9000.0, 9500.0, 9900.0], Some(vec![250000.0])),
                    peer("HAProxy", vec![4000.0, 4100.0, 4200.0], None),
                ],
                cps_vs_nftables: Stats::of(vec![1.01, 1.02, 1.03]),
                cps_vs_haproxy: Stats::of(vec![2.31, 2.32, 2.33]),
                rtt_p50_vs_direct: Stats::of(vec![1.0, 1.05, 1.1]),
                xdp_ns_per_packet: Stats::of(vec![95.0, 96.0, 97.0]),
                setup: "veth bridge, 3 backends".into(),
                ..Default::default()
            }),
            failover: None,
            checks: vec![
                Check {
                    name: "Maglev build, 1000 backends, M = 65537".into(),
                    target: "< 10 ms (median)".into(),
                    measured: "4.50 ms".into(),
                    holds: true,
                },
                Check {
                    name: "conn/s against HAProxy".into(),
                    target: ">= 3x".into(),
                    measured: "2.32x".into(),
                    holds: false,
                },
            ],
            notes: BTreeMap::from([("nftables".into(), "not installed".into())]),
        }
    }

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(axis_number(&0.0), "0");
        assert_eq!(axis_number(&2.5), "2.5");
        assert_eq!(axis_number(&0.001), "0.001");
        assert_eq!(axis_number(&150.0), "150");
        assert_eq!(axis_number(&25000.0), "25k");
        assert_eq!(axis_number(&1_500_000.0), "1.5M");
    }

    #[test]
    fn text_shows_the_figures_and_the_verdicts() {
        let text = render_text(&fake());
        for needle in [
            "Test CPU",
            "abc1234",
            "TCP SYN, new flow",
            "70.0 / 73.5 / 80.0",
            "52.5 (50.0..58.0)",
            "<= 120 ns",
            "4.25 / 4.50 / 4.75",
            "3.00 MiB",
            "0.645% (0.100%)",
            "0.90 / 0.95 / 1.00",
            "9000 / 9500 / 9900",
            "10.0.0.12 300 (75.0%)",
            "250000 / 312500",
            "connect: timed out: 3",
            "veth bridge, 3 backends",
            "n/a",
            "2.31 / 2.32 / 2.33",
            "95.0 / 96.0 / 97.0",
            "1 of 2 targets hold",
            "MISSED",
            "not installed",
            "a control note",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
        // Aligned: the rows of one table have the same length up to their last column.
        let empty = render_text(&Report::default());
        assert!(!empty.contains("DATA PATH") && !empty.contains("END TO END"));
    }

    #[test]
    fn files_are_valid_json_and_an_svg_with_the_labels() {
        let dir = std::env::temp_dir().join(format!("xdplb-report-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let paths = write_files(&fake(), &dir).unwrap();
        assert_eq!(paths, [dir.join("bench.json"), dir.join("bench.svg")]);

        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&paths[0]).unwrap()).unwrap();
        assert_eq!(json["control"]["maglev"][0]["backends"], 1000);
        assert_eq!(json["e2e"]["peers"][1]["udp_pps"], serde_json::Value::Null);
        assert_eq!(json["checks"][1]["holds"], false);

        let svg = std::fs::read_to_string(&paths[1]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for label in [
            "Data path: ns per packet",
            "1 VIP x 3 backends: TCP SYN, new flow",
            "floor: return XDP_TX",
            "End to end: TCP connections/s",
            "HAProxy",
            "UDP datagrams/s delivered",
            "Maglev table build",
            "N=1000 M=65537",
            "Change to live in the kernel",
            "milliseconds",
            "missed: conn/s against HAProxy",
        ] {
            assert!(svg.contains(label), "{label:?} missing from the SVG");
        }

        // Sections that did not run leave no panel behind.
        let mut partial = fake();
        partial.datapath = None;
        partial.e2e = None;
        write_files(&partial, &dir).unwrap();
        let svg = std::fs::read_to_string(dir.join("bench.svg")).unwrap();
        assert!(svg.contains("Maglev table build") && !svg.contains("Data path"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
