//! PNG plots (plotters' bitmap backend): connection rate and RR latency against the number of
//! services, one line per dataplane, and the per-packet cost per case. Text is drawn with
//! plotters' `ab_glyph` renderer from the DejaVu Sans file of Debian's fonts-dejavu-core (no
//! fontconfig); without that file the plots are drawn without text and the report says so.

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

use super::{
    prog_run::CASES,
    traffic::{Dataplane, TrafficResult},
    Results,
};

const FONT_FILE: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers the font once; false when there is none (plots then carry no text).
fn font_ready() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        let Ok(bytes) = std::fs::read(FONT_FILE) else {
            return false;
        };
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .is_ok()
    })
}

const COLORS: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
];

/// One series: a label and (services, value) points.
type Series = (String, Vec<(f64, f64)>);

fn line_chart(path: &Path, title: &str, y_label: &str, series: &[Series]) -> anyhow::Result<()> {
    let text = font_ready();
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(x, _)| *x))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .collect();
    let (x_min, x_max) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min).max(1.0),
        xs.iter().copied().fold(1.0, f64::max),
    );
    let y_max = ys.iter().copied().fold(0.0, f64::max) * 1.15 + 1e-9;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if text {
        builder
            .caption(title, ("sans-serif", 22))
            .x_label_area_size(45)
            .y_label_area_size(70);
    }
    let mut chart =
        builder.build_cartesian_2d((x_min * 0.8..x_max * 1.25).log_scale(), 0.0..y_max)?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("services (log scale)")
            .y_desc(y_label)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"));
    } else {
        mesh.disable_x_mesh()
            .disable_y_mesh()
            .x_labels(0)
            .y_labels(0);
    }
    mesh.draw()?;
    for (i, (label, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let drawn = chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?;
        if text {
            drawn.label(label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn traffic_series(rows: &[TrafficResult], value: impl Fn(&TrafficResult) -> f64) -> Vec<Series> {
    [
        Dataplane::Sluice,
        Dataplane::Iptables,
        Dataplane::Nftables,
        Dataplane::Direct,
    ]
    .iter()
    .map(|d| {
        (
            d.label().to_string(),
            rows.iter()
                .filter(|r| r.dataplane == *d)
                .map(|r| (r.services as f64, value(r)))
                .collect(),
        )
    })
    .filter(|(_, p): &Series| !p.is_empty())
    .collect()
}

/// Draws what `results` has; returns the file names written (relative to `out`).
pub fn draw(out: &Path, results: &Results) -> anyhow::Result<Vec<String>> {
    let mut written = Vec::new();
    if !results.packet.is_empty() {
        let series: Vec<Series> = CASES
            .iter()
            .map(|case| {
                (
                    case.to_string(),
                    results
                        .packet
                        .iter()
                        .filter(|r| r.case == *case)
                        .map(|r| (r.services as f64, r.ns.mean))
                        .collect(),
                )
            })
            .collect();
        line_chart(
            &out.join("packet-cost.png"),
            "Per-packet cost (BPF_PROG_RUN)",
            "ns per packet (mean)",
            &series,
        )?;
        written.push("packet-cost.png".to_string());
    }
    if !results.traffic.is_empty() {
        line_chart(
            &out.join("connection-rate.png"),
            "New connections per second through a ClusterIP",
            "connections/s",
            &traffic_series(&results.traffic, |r| r.connections_per_s),
        )?;
        line_chart(
            &out.join("rr-latency.png"),
            "Request/response latency (p50) over one connection",
            "µs (p50)",
            &traffic_series(&results.traffic, |r| r.rr_us.p50),
        )?;
        written.push("connection-rate.png".to_string());
        written.push("rr-latency.png".to_string());
    }
    if !written.is_empty() && !font_ready() {
        eprintln!(
            "bench: {FONT_FILE} not found: the plots have no text (install fonts-dejavu-core)"
        );
    }
    Ok(written)
}
