//! Collecting samples per case, metric and variant, and writing them out: a Markdown table
//! on stdout and the JSON report tools read (`bench/results/<scenario>.json`).

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::mesh::Variant;

/// Where a scenario's report goes (`--json FILE`, `--svg DIR`): the same two options on
/// every scenario.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Output {
    /// Where to write the JSON report (default `bench/results/<scenario>.json`).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Directory to write the SVG chart `<scenario>.svg` to (default `bench/results`).
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

/// One metric of one case, with every round's value per variant.
#[derive(Debug)]
struct Series {
    case: String,
    metric: &'static str,
    higher_is_better: bool,
    values: [Vec<f64>; 3],
}

/// One row of a report: the means over the rounds of one case's metric, per variant
/// (direct, ferry, envoy; `None` where that variant recorded nothing).
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    /// The case.
    pub case: &'a str,
    /// The metric (its name ends in its unit).
    pub metric: &'static str,
    /// Whether a larger value is better.
    pub higher_is_better: bool,
    /// Means per variant, in [`Variant::ALL`] order.
    pub values: [Option<f64>; 3],
}

/// The samples of one scenario, in the order they were first recorded.
#[derive(Debug)]
pub struct Report {
    scenario: &'static str,
    series: Vec<Series>,
}

fn slot(v: Variant) -> usize {
    match v {
        Variant::Direct => 0,
        Variant::Ferry => 1,
        Variant::Envoy => 2,
    }
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

impl Report {
    /// An empty report for `scenario`.
    pub fn new(scenario: &'static str) -> Self {
        Self {
            scenario,
            series: Vec::new(),
        }
    }

    /// Records one round's `value` of `metric` for `case` through `variant`.
    pub fn record(
        &mut self,
        case: &str,
        metric: &'static str,
        higher_is_better: bool,
        variant: Variant,
        value: f64,
    ) {
        let i = match self
            .series
            .iter()
            .position(|s| s.case == case && s.metric == metric)
        {
            Some(i) => i,
            None => {
                self.series.push(Series {
                    case: case.to_owned(),
                    metric,
                    higher_is_better,
                    values: Default::default(),
                });
                self.series.len() - 1
            }
        };
        self.series[i].values[slot(variant)].push(value);
    }

    /// The Markdown table: one row per case and metric, means over the rounds.
    pub fn table(&self) -> String {
        let fmt = |v: Option<f64>| match v {
            Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
            Some(x) => format!("{x:.3}"),
            None => "–".to_owned(),
        };
        let mut out = format!(
            "### {}\n\n| case | metric | direct | ferry | envoy | ferry/envoy |\n|---|---|---:|---:|---:|---:|\n",
            self.scenario
        );
        for s in &self.series {
            let [d, f, e] = [0, 1, 2].map(|i| mean(&s.values[i]));
            let ratio = match (f, e) {
                (Some(f), Some(e)) if e != 0.0 => format!("**{:.2}x**", f / e),
                _ => "–".to_owned(),
            };
            let arrow = if s.higher_is_better { "↑" } else { "↓" };
            out += &format!(
                "| {} | {} {arrow} | {} | {} | {} | {ratio} |\n",
                s.case,
                s.metric,
                fmt(d),
                fmt(f),
                fmt(e)
            );
        }
        out
    }

    /// The means per case and metric, in the order first recorded.
    pub fn rows(&self) -> Vec<Row<'_>> {
        self.series
            .iter()
            .map(|s| Row {
                case: &s.case,
                metric: s.metric,
                higher_is_better: s.higher_is_better,
                values: [0, 1, 2].map(|i| mean(&s.values[i])),
            })
            .collect()
    }

    /// The SVG chart (see [`crate::chart`]).
    pub fn svg(&self) -> anyhow::Result<String> {
        crate::chart::render(self.scenario, &self.rows())
    }

    /// Writes [`Report::svg`] to `<dir>/<scenario>.svg`, `dir` defaulting to
    /// `bench/results`.
    pub fn write_svg(&self, dir: Option<&Path>) -> anyhow::Result<PathBuf> {
        let dir = dir.map(Path::to_owned).unwrap_or_else(results_dir);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.svg", self.scenario));
        std::fs::write(&path, self.svg()?)?;
        Ok(path)
    }

    /// The JSON report.
    pub fn json(&self) -> serde_json::Value {
        let results: Vec<_> = self
            .series
            .iter()
            .map(|s| {
                let [d, f, e] = [0, 1, 2].map(|i| mean(&s.values[i]));
                let ratio = match (f, e) {
                    (Some(f), Some(e)) if e != 0.0 => Some(f / e),
                    _ => None,
                };
                json!({
                    "case": s.case,
                    "metric": s.metric,
                    "higher_is_better": s.higher_is_better,
                    "direct": d,
                    "ferry": f,
                    "envoy": e,
                    "ratio_ferry_envoy": ratio,
                    "rounds": s.values.iter().map(Vec::len).max().unwrap_or(0),
                })
            })
            .collect();
        json!({
            "scenario": self.scenario,
            "machine": machine(),
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "results": results,
        })
    }

    /// Writes [`Report::json`] to `path`, or to `bench/results/<scenario>.json`.
    pub fn write_json(&self, path: Option<&Path>) -> anyhow::Result<PathBuf> {
        let path = path
            .map(Path::to_owned)
            .unwrap_or_else(|| results_dir().join(format!("{}.json", self.scenario)));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(&self.json())? + "\n")?;
        Ok(path)
    }
}

/// Where reports go by default: `bench/results` in this workspace.
pub fn results_dir() -> PathBuf {
    testkit::workspace_root().join("bench/results")
}

/// What the numbers were measured on.
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|k| k.trim().to_owned());
    json!({
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": model,
        "kernel": kernel,
        "ktls": std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
            .map(|u| u.split_whitespace().any(|m| m == "tls"))
            .unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_shape_tools_read() {
        let mut r = Report::new("throughput");
        for (v, x) in [
            (Variant::Direct, 30.0),
            (Variant::Ferry, 12.0),
            (Variant::Envoy, 8.0),
        ] {
            r.record("IstioMtls-1conn", "gbit_per_s", true, v, x);
        }
        let j = r.json();
        assert_eq!(j["scenario"], "throughput");
        let row = &j["results"][0];
        assert_eq!(row["case"], "IstioMtls-1conn");
        assert_eq!(row["higher_is_better"], true);
        assert_eq!(row["ratio_ferry_envoy"], 1.5);
        assert!(j["machine"]["cores"].as_u64().is_some());
        assert!(r.table().contains("**1.50x**"));
    }
}
