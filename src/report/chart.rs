//! PHI calls per day as an inline SVG bar chart: allowed above the axis,
//! refused stacked on top in another shade. No script, no external asset;
//! the numbers are also in the table next to it (a chart is not evidence).

use super::Day;
use super::html::escape;

const WIDTH: usize = 720;
const HEIGHT: usize = 180;
const LEFT: usize = 36;
const BOTTOM: usize = 28;

/// The chart for `days` (oldest first).
pub fn per_day(days: &[Day]) -> String {
    let max = days.iter().map(|d| d.allowed + d.refused).max().unwrap_or(0).max(1);
    let plot_w = WIDTH - LEFT - 8;
    let plot_h = HEIGHT - BOTTOM - 8;
    let slot = if days.is_empty() { plot_w } else { plot_w / days.len() };
    let bar = (slot * 7 / 10).clamp(2, 48);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="PHI calls per day" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}">"#
    );
    svg.push_str(&format!(
        r##"<line x1="{LEFT}" y1="{y}" x2="{x2}" y2="{y}" stroke="#444"/><text x="{tx}" y="{ty}" font-size="10" text-anchor="end">{max}</text><text x="{tx}" y="{y}" font-size="10" text-anchor="end">0</text>"##,
        y = 8 + plot_h,
        x2 = WIDTH - 8,
        tx = LEFT - 4,
        ty = 16,
    ));
    let every = days.len().div_ceil(8).max(1);
    for (i, d) in days.iter().enumerate() {
        let x = LEFT + i * slot + (slot - bar) / 2;
        let h_allowed = d.allowed * plot_h / max;
        let h_refused = d.refused * plot_h / max;
        let base = 8 + plot_h;
        svg.push_str(&format!(
            r##"<rect class="allowed" x="{x}" y="{y}" width="{bar}" height="{h_allowed}" fill="#2b6cb0"><title>{day}: {a} allowed</title></rect>"##,
            y = base - h_allowed,
            day = escape(&d.day),
            a = d.allowed
        ));
        if d.refused > 0 {
            svg.push_str(&format!(
                r##"<rect class="refused" x="{x}" y="{y}" width="{bar}" height="{h_refused}" fill="#c53030"><title>{day}: {r} refused</title></rect>"##,
                y = base - h_allowed - h_refused,
                day = escape(&d.day),
                r = d.refused
            ));
        }
        if i % every == 0 {
            svg.push_str(&format!(
                r#"<text x="{cx}" y="{ty}" font-size="10" text-anchor="middle">{day}</text>"#,
                cx = x + bar / 2,
                ty = HEIGHT - 10,
                day = escape(d.day.get(5..).unwrap_or(&d.day))
            ));
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bar_per_day_scaled_to_the_busiest() {
        let days = vec![
            Day { day: "2026-11-25".into(), allowed: 4, refused: 0 },
            Day { day: "2026-11-26".into(), allowed: 2, refused: 2 },
        ];
        let svg = per_day(&days);
        assert_eq!(svg.matches(r#"class="allowed""#).count(), 2);
        assert_eq!(svg.matches(r#"class="refused""#).count(), 1);
        assert!(svg.contains("2026-11-26: 2 refused"));
        // The busiest day fills the plot: 4 of 4.
        assert!(svg.contains(&format!(r#"height="{}""#, HEIGHT - BOTTOM - 8)));
        assert!(per_day(&[]).starts_with("<svg"));
    }
}
