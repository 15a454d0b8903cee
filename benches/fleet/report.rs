//! Figures gathered over the rounds: medians, min–max, the ratios seg/nginx and seg/HAProxy,
//! as a Markdown table and as `target/fleet/report.json`.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::peers::Kind;

/// One figure of one scenario, measured for each proxy in each round (NaN: not measured or
/// not reached).
pub struct Row {
    pub scenario: &'static str,
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub values: BTreeMap<Kind, Vec<f64>>,
}

#[derive(Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Per proxy: facts that are not numbers (identity header sample, abort behaviour...).
    pub facts: BTreeMap<Kind, Vec<String>>,
    pub notes: Vec<String>,
}

pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

pub fn summary(values: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
        runs: n,
    })
}

/// What one table row measures.
pub struct Figure {
    pub scenario: &'static str,
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

impl Figure {
    pub const fn new(
        scenario: &'static str,
        key: &'static str,
        label: &'static str,
        unit: &'static str,
        higher_is_better: bool,
    ) -> Figure {
        Figure {
            scenario,
            key,
            label,
            unit,
            higher_is_better,
        }
    }
}

impl Report {
    /// Records one round's value of `figure` for `kind`.
    pub fn add(&mut self, figure: &Figure, kind: Kind, value: f64) {
        let row = match self.rows.iter().position(|r| r.key == figure.key) {
            Some(i) => &mut self.rows[i],
            None => {
                self.rows.push(Row {
                    scenario: figure.scenario,
                    key: figure.key,
                    label: figure.label,
                    unit: figure.unit,
                    higher_is_better: figure.higher_is_better,
                    values: BTreeMap::new(),
                });
                self.rows.last_mut().expect("just pushed")
            }
        };
        row.values.entry(kind).or_default().push(value);
    }

    pub fn fact(&mut self, kind: Kind, text: String) {
        let facts = self.facts.entry(kind).or_default();
        if !facts.contains(&text) {
            facts.push(text);
        }
    }

    /// For a lower-is-better figure: in how many rounds seg's value was at or below the better
    /// peer's of the same round, out of the rounds all three were measured.
    pub fn rounds_seg_leads(&self, figure: &Figure) -> Option<(usize, usize)> {
        let row = self.rows.iter().find(|r| r.key == figure.key)?;
        let seg = row.values.get(&Kind::Seg)?;
        let peers: Vec<&Vec<f64>> = [Kind::Nginx, Kind::Haproxy]
            .iter()
            .filter_map(|k| row.values.get(k))
            .collect();
        if peers.is_empty() {
            return None;
        }
        let mut led = 0;
        let mut rounds = 0;
        for (round, value) in seg.iter().enumerate() {
            let best = peers
                .iter()
                .filter_map(|p| p.get(round).copied())
                .fold(f64::INFINITY, f64::min);
            if value.is_finite() && best.is_finite() {
                rounds += 1;
                led += usize::from(*value <= best);
            }
        }
        Some((led, rounds))
    }

    fn ratio(row: &Row, peer: Kind) -> Option<f64> {
        let seg = summary(row.values.get(&Kind::Seg)?)?.median;
        let other = summary(row.values.get(&peer)?)?.median;
        (other != 0.0).then_some(seg / other)
    }

    pub fn markdown(&self, kinds: &[Kind]) -> String {
        let mut out = String::new();
        out.push_str("| scenario | figure |");
        for k in kinds {
            out.push_str(&format!(" {} |", k.name()));
        }
        out.push_str(" seg/nginx | seg/haproxy |\n|---|---|");
        for _ in kinds {
            out.push_str("---:|");
        }
        out.push_str("---:|---:|\n");
        for row in &self.rows {
            let better = if row.higher_is_better { "↑" } else { "↓" };
            out.push_str(&format!(
                "| {} | {} ({}, {}) |",
                row.scenario, row.label, row.unit, better
            ));
            for k in kinds {
                let cell = match row.values.get(k).and_then(|v| summary(v)) {
                    Some(s) if s.runs > 1 => {
                        format!("{} ({}–{})", number(s.median), number(s.min), number(s.max))
                    }
                    Some(s) => number(s.median),
                    None => "—".into(),
                };
                out.push_str(&format!(" {cell} |"));
            }
            for peer in [Kind::Nginx, Kind::Haproxy] {
                let cell = Report::ratio(row, peer)
                    .map(|r| format!("{r:.2}×"))
                    .unwrap_or_else(|| "—".into());
                out.push_str(&format!(" {cell} |"));
            }
            out.push('\n');
        }
        if !self.facts.is_empty() {
            out.push('\n');
            for (kind, facts) in &self.facts {
                for fact in facts {
                    out.push_str(&format!("- **{}**: {fact}\n", kind.name()));
                }
            }
        }
        if !self.notes.is_empty() {
            out.push('\n');
            for note in &self.notes {
                out.push_str(&format!("- {note}\n"));
            }
        }
        out
    }

    pub fn json(&self, header: Value) -> Value {
        let mut scenarios: Vec<Value> = Vec::new();
        for row in &self.rows {
            let mut proxies = serde_json::Map::new();
            for (kind, values) in &row.values {
                let runs: Vec<Value> = values
                    .iter()
                    .map(|v| if v.is_finite() { json!(v) } else { Value::Null })
                    .collect();
                let figure = match summary(values) {
                    Some(s) => {
                        json!({"median": s.median, "min": s.min, "max": s.max, "runs": runs})
                    }
                    None => json!({"median": null, "min": null, "max": null, "runs": runs}),
                };
                proxies.insert(kind.name().into(), figure);
            }
            scenarios.push(json!({
                "scenario": row.scenario,
                "key": row.key,
                "figure": row.label,
                "unit": row.unit,
                "higher_is_better": row.higher_is_better,
                "proxies": proxies,
                "ratios": {
                    "seg/nginx": Report::ratio(row, Kind::Nginx),
                    "seg/haproxy": Report::ratio(row, Kind::Haproxy),
                },
            }));
        }
        let facts: serde_json::Map<String, Value> = self
            .facts
            .iter()
            .map(|(k, v)| (k.name().to_string(), json!(v)))
            .collect();
        json!({
            "run": header,
            "scenarios": scenarios,
            "facts": facts,
            "notes": self.notes,
        })
    }
}

/// A figure with sensible precision.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}
