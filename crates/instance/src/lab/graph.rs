//! A lab's topology as a picture: Graphviz DOT (for `dot -Tsvg` and other tools) or an SVG
//! drawn here with the nodes on a circle, so `cela lab graph LAB > lab.svg` needs nothing
//! installed. Nodes are boxes (name, kind, image), the lab's networks ellipses, links lines
//! labelled with their interfaces and addresses and, when impaired, the impairment.

use std::fmt::Write as _;

use super::Lab;
use super::file::End;

fn end_label(e: &End) -> String {
    match e.address {
        Some((a, p)) => format!("{}\n{a}/{p}", e.iface),
        None => e.iface.clone(),
    }
}

/// Quotes for DOT: a double-quoted ID with `"` and `\` escaped, newlines as `\n`.
fn dot_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn impairment_of(lab: &Lab, i: usize) -> Option<String> {
    let now = lab.links.get(i).map(|l| l.impair);
    let impair = now.unwrap_or(lab.plan.links[i].impair);
    (!impair.is_none()).then(|| impair.describe())
}

/// The topology in Graphviz's DOT language.
pub fn dot(lab: &Lab) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "graph {} {{", dot_quote(&lab.name));
    let _ = writeln!(out, "  node [shape=box, fontname=\"sans-serif\"];");
    for n in &lab.plan.nodes {
        let label = format!("{}\n{} {}", n.name, n.kind, n.image);
        let _ = writeln!(
            out,
            "  {} [label={}];",
            dot_quote(&n.name),
            dot_quote(&label)
        );
    }
    for net in &lab.plan.networks {
        let _ = writeln!(
            out,
            "  {} [shape=ellipse, label={}];",
            dot_quote(&format!("net:{}", net.name)),
            dot_quote(&format!(
                "{}\n{}",
                net.name,
                net.subnet.as_deref().unwrap_or("network")
            ))
        );
    }
    for n in &lab.plan.nodes {
        for net in &n.networks {
            let _ = writeln!(
                out,
                "  {} -- {} [style=dashed];",
                dot_quote(&n.name),
                dot_quote(&format!("net:{net}"))
            );
        }
    }
    for (i, l) in lab.plan.links.iter().enumerate() {
        let mut attrs = vec![
            format!("taillabel={}", dot_quote(&end_label(&l.ends[0]))),
            format!("headlabel={}", dot_quote(&end_label(&l.ends[1]))),
        ];
        if let Some(imp) = impairment_of(lab, i) {
            attrs.push(format!("label={}, color=red", dot_quote(&imp)));
        }
        let _ = writeln!(
            out,
            "  {} -- {} [{}];",
            dot_quote(&l.ends[0].node),
            dot_quote(&l.ends[1].node),
            attrs.join(", ")
        );
    }
    out.push_str("}\n");
    out
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Text lines centred at (x, y).
fn text(out: &mut String, x: f64, y: f64, lines: &[String], size: u32) {
    let first = y - (lines.len() as f64 - 1.0) * f64::from(size) * 0.6;
    for (k, line) in lines.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<text x="{x:.1}" y="{:.1}" font-size="{size}" text-anchor="middle">{}</text>"#,
            first + k as f64 * f64::from(size) * 1.2,
            xml(line)
        );
    }
}

/// The topology as an SVG picture: nodes and networks evenly on a circle.
pub fn svg(lab: &Lab) -> String {
    let mut names: Vec<String> = lab.plan.nodes.iter().map(|n| n.name.clone()).collect();
    names.extend(lab.plan.networks.iter().map(|n| format!("net:{}", n.name)));
    let count = names.len().max(1) as f64;
    let radius = (count * 40.0).max(160.0);
    let size = 2.0 * radius + 260.0;
    let centre = size / 2.0;
    let at = |name: &str| -> (f64, f64) {
        let k = names.iter().position(|n| n == name).unwrap_or(0) as f64;
        let angle = std::f64::consts::TAU * k / count - std::f64::consts::FRAC_PI_2;
        (centre + radius * angle.cos(), centre + radius * angle.sin())
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{size:.0}" height="{size:.0}" viewBox="0 0 {size:.0} {size:.0}" font-family="sans-serif">"#
    );
    let _ = writeln!(out, "<title>{}</title>", xml(&lab.name));
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    text(&mut out, centre, 24.0, &[format!("lab {}", lab.name)], 16);
    for n in &lab.plan.nodes {
        for net in &n.networks {
            let ((x1, y1), (x2, y2)) = (at(&n.name), at(&format!("net:{net}")));
            let _ = writeln!(
                out,
                r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="gray" stroke-dasharray="6,4"/>"#
            );
        }
    }
    for (i, l) in lab.plan.links.iter().enumerate() {
        let ((x1, y1), (x2, y2)) = (at(&l.ends[0].node), at(&l.ends[1].node));
        let impaired = impairment_of(lab, i);
        let colour = if impaired.is_some() { "red" } else { "black" };
        let _ = writeln!(
            out,
            r#"<line x1="{x1:.1}" y1="{y1:.1}" x2="{x2:.1}" y2="{y2:.1}" stroke="{colour}" stroke-width="2"/>"#
        );
        // Each end's label a quarter of the way from its node; the impairment mid-way.
        for (k, (fx, fy)) in [(0.28, 0.28), (0.72, 0.72)].into_iter().enumerate() {
            let (x, y) = (x1 + (x2 - x1) * fx, y1 + (y2 - y1) * fy);
            let lines: Vec<String> = end_label(&l.ends[k]).lines().map(str::to_owned).collect();
            text(&mut out, x, y, &lines, 11);
        }
        if let Some(imp) = impaired {
            text(
                &mut out,
                (x1 + x2) / 2.0,
                (y1 + y2) / 2.0 - 24.0,
                &[imp],
                11,
            );
        }
    }
    for n in &lab.plan.nodes {
        let (x, y) = at(&n.name);
        let _ = writeln!(
            out,
            r##"<rect x="{:.1}" y="{:.1}" width="120" height="46" rx="6" fill="#e8f0fe" stroke="#3367d6"/>"##,
            x - 60.0,
            y - 23.0
        );
        text(
            &mut out,
            x,
            y,
            &[n.name.clone(), format!("{} {}", n.kind, n.image)],
            11,
        );
    }
    for net in &lab.plan.networks {
        let (x, y) = at(&format!("net:{}", net.name));
        let _ = writeln!(
            out,
            r##"<ellipse cx="{x:.1}" cy="{y:.1}" rx="62" ry="24" fill="#fef7e0" stroke="#e37400"/>"##
        );
        text(
            &mut out,
            x,
            y,
            &[
                net.name.clone(),
                net.subnet.clone().unwrap_or_else(|| "network".into()),
            ],
            11,
        );
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::file::LabFile;

    fn lab() -> Lab {
        let plan = LabFile::parse(
            r#"
name: g
topology:
  networks: {lan: {}}
  nodes:
    a: {image: "img<1>", networks: [lan]}
    b: {image: i}
  links:
    - endpoints: ["a:eth1", "b:eth1"]
      addresses: ["10.0.0.1/30", "10.0.0.2/30"]
      impair: {delay: 5ms}
"#,
        )
        .unwrap()
        .plan(None)
        .unwrap();
        Lab {
            name: "g".into(),
            id: "abcdef012345".into(),
            created: String::new(),
            plan,
            nodes: Default::default(),
            networks: Vec::new(),
            links: Vec::new(),
            complete: false,
        }
    }

    #[test]
    fn dot_names_every_node_link_and_network() {
        let d = dot(&lab());
        assert!(d.starts_with("graph \"g\" {"));
        assert!(
            d.contains(r#""a" -- "b" [taillabel="eth1\n10.0.0.1/30""#),
            "{d}"
        );
        assert!(d.contains("label=\"delay 5ms\", color=red"), "{d}");
        assert!(d.contains(r#""a" -- "net:lan" [style=dashed]"#), "{d}");
    }

    #[test]
    fn svg_is_escaped_and_complete() {
        let s = svg(&lab());
        assert!(s.starts_with("<svg ") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("img&lt;1&gt;") && !s.contains("img<1>"));
        assert_eq!(s.matches("<line ").count(), 2);
    }
}
