//! `cargo xtask charts`: SVG charts for the README from the criterion
//! results `cargo xtask bench` copied out of the emulated host
//! (target/criterion-rig/), written to docs/charts/:
//!
//! - `restore_latency.svg`: restore latency against guest memory size
//!   (`snapshot_restore/<size>`, `floor_restore/<size>`,
//!   `restore_call*/<size>/<mode>`);
//! - `diff_cost.svg`: diff snapshot cost against dirty pages
//!   (`diff_create/<size>/<pct>pct`, and `diff_harvest/<size>` as the
//!   nothing-dirty point);
//! - `resume_ws.svg`: restore until the guest touched its working set, lazy
//!   against prefetch, hot page cache (`resume_ws/<size>/<pattern>/<mode>`)
//!   and cold (`resume_ws_cold/...`) when a run has it.
//!
//! Every value is criterion's point estimate of the median
//! (`new/estimates.json`). A chart without data is skipped with a message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::svg::{BarChart, BarSeries, LineChart, Series};
use crate::util::{self, Context, Result};

/// The caption under every chart.
pub const CAPTION: &str = "emulated arm64 host (QEMU TCG), ratios only; \
                           points are criterion's median estimates";

/// One benchmark's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The benchmark group, e.g. `resume_ws`.
    pub group: String,
    /// The rest of the id, split on `/`: e.g. `["1024MiB", "seq32", "lazy"]`.
    pub parts: Vec<String>,
    /// Point estimate of the median, in nanoseconds.
    pub median_ns: f64,
}

/// Reads one benchmark from its `new/` directory (`benchmark.json` names
/// it, `estimates.json` holds the numbers).
pub fn read_record(new_dir: &Path) -> Result<Record> {
    let read = |name: &str| -> Result<serde_json::Value> {
        let path = new_dir.join(name);
        let text =
            std::fs::read_to_string(&path).context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .context(|| format!("{} is not JSON (a truncated copy?)", path.display()))
    };
    let benchmark = read("benchmark.json")?;
    let estimates = read("estimates.json")?;
    let group = benchmark["group_id"]
        .as_str()
        .filter(|g| !g.is_empty())
        .ok_or_else(|| {
            util::Error::msg(format!(
                "{} has no group_id: not a criterion benchmark.json",
                new_dir.join("benchmark.json").display()
            ))
        })?
        .to_string();
    let mut parts = Vec::new();
    for key in ["function_id", "value_str"] {
        if let Some(part) = benchmark[key].as_str() {
            parts.extend(part.split('/').map(str::to_string));
        }
    }
    let median_ns = estimates["median"]["point_estimate"]
        .as_f64()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .ok_or_else(|| {
            util::Error::msg(format!(
                "{} has no usable median.point_estimate",
                new_dir.join("estimates.json").display()
            ))
        })?;
    Ok(Record {
        group,
        parts,
        median_ns,
    })
}

/// Every benchmark under a criterion directory (each `*/new/benchmark.json`,
/// criterion's own `report/` pages skipped), sorted by id; files that do not
/// parse are left out and described in the second list.
pub fn read_records(dir: &Path) -> Result<(Vec<Record>, Vec<String>)> {
    let mut new_dirs = Vec::new();
    find_new_dirs(dir, &mut new_dirs)?;
    let mut records = Vec::new();
    let mut problems = Vec::new();
    for new_dir in new_dirs {
        match read_record(&new_dir) {
            Ok(record) => records.push(record),
            Err(e) => problems.push(e.to_string()),
        }
    }
    records.sort_by(|a, b| (&a.group, &a.parts).cmp(&(&b.group, &b.parts)));
    Ok((records, problems))
}

fn find_new_dirs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).context(|| format!("cannot list {}", dir.display()))?;
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for path in dirs {
        let name = path.file_name().unwrap_or_default();
        if name == "report" {
            continue;
        }
        if name == "new" && path.join("benchmark.json").is_file() {
            out.push(path);
        } else {
            find_new_dirs(&path, out)?;
        }
    }
    Ok(())
}

/// `1024MiB` -> 1024.
fn mib(part: &str) -> Option<f64> {
    part.strip_suffix("MiB")?
        .parse::<u64>()
        .ok()
        .map(|v| v as f64)
}

/// The unit that keeps the largest value readable: (name, nanoseconds per unit).
pub fn time_unit(max_ns: f64) -> (&'static str, f64) {
    if max_ns >= 1e9 {
        ("s", 1e9)
    } else if max_ns >= 1e6 {
        ("ms", 1e6)
    } else if max_ns >= 1e3 {
        ("µs", 1e3)
    } else {
        ("ns", 1.0)
    }
}

/// Series in the order their labels were first met.
#[derive(Default)]
struct Lines {
    order: Vec<String>,
    points: BTreeMap<String, Vec<(f64, f64)>>,
}

impl Lines {
    fn add(&mut self, label: String, x: f64, ns: f64) {
        if !self.points.contains_key(&label) {
            self.order.push(label.clone());
        }
        self.points.entry(label).or_default().push((x, ns));
    }

    /// The series, y converted from nanoseconds to one unit; None if empty.
    fn into_series(mut self) -> Option<(Vec<Series>, &'static str)> {
        let max = self
            .points
            .values()
            .flatten()
            .map(|p| p.1)
            .fold(0.0, f64::max);
        if self.order.is_empty() {
            return None;
        }
        let (unit, scale) = time_unit(max);
        let series = self
            .order
            .iter()
            .map(|label| Series {
                label: label.clone(),
                points: self
                    .points
                    .remove(label)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(x, ns)| (x, ns / scale))
                    .collect(),
            })
            .collect();
        Some((series, unit))
    }
}

/// Restore latency against guest memory size.
pub fn restore_chart(records: &[Record]) -> Option<LineChart> {
    let mut lines = Lines::default();
    for r in records {
        let label = match (r.group.as_str(), r.parts.as_slice()) {
            ("snapshot_restore", [_]) => "snapshot_restore".to_string(),
            ("floor_restore", [_]) => "floor_restore (no dormouse)".to_string(),
            (group, [_, mode]) if group.starts_with("restore_call") => {
                format!("{group}, {mode}")
            }
            _ => continue,
        };
        if let Some(x) = mib(&r.parts[0]) {
            lines.add(label, x, r.median_ns);
        }
    }
    let (series, unit) = lines.into_series()?;
    Some(LineChart {
        title: "Restore latency against guest memory".to_string(),
        x_label: "guest memory (MiB)".to_string(),
        y_label: format!("restore latency, median ({unit})"),
        caption: CAPTION.to_string(),
        series,
    })
}

/// The pages benches/diff.rs dirties for `pct` percent of a `mib` guest:
/// every page but the payload's first two, times pct / 100.
fn dirty_pages(mib: f64, pct: u64) -> f64 {
    let pages = (mib as u64) * 256 - 2;
    (pages * pct / 100) as f64
}

/// Diff snapshot cost against dirty pages, a line per guest size.
pub fn diff_chart(records: &[Record]) -> Option<LineChart> {
    let mut lines = Lines::default();
    let mut sizes: Vec<f64> = records
        .iter()
        .filter(|r| r.group == "diff_create" || r.group == "diff_harvest")
        .filter_map(|r| mib(r.parts.first()?))
        .collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup();
    // Labels first, in size order, so the legend reads small to large.
    for size in &sizes {
        lines.order.push(format!("{size} MiB guest"));
    }
    for r in records {
        let (size, dirty) = match (r.group.as_str(), r.parts.as_slice()) {
            ("diff_create", [size, pct]) => {
                let Some(pct) = pct.strip_suffix("pct").and_then(|p| p.parse().ok()) else {
                    continue;
                };
                let Some(size) = mib(size) else { continue };
                (size, dirty_pages(size, pct))
            }
            ("diff_harvest", [size]) => match mib(size) {
                Some(size) => (size, 0.0),
                None => continue,
            },
            _ => continue,
        };
        lines
            .points
            .entry(format!("{size} MiB guest"))
            .or_default()
            .push((dirty, r.median_ns));
    }
    lines.order.retain(|l| lines.points.contains_key(l));
    let (series, unit) = lines.into_series()?;
    Some(LineChart {
        title: "Diff snapshot cost against dirty pages".to_string(),
        x_label: "dirty 4 KiB pages (0 = diff_harvest, nothing dirty)".to_string(),
        y_label: format!("snapshot_diff, median ({unit})"),
        caption: CAPTION.to_string(),
        series,
    })
}

/// Where a working-set pattern sorts: the bench's order, others after.
fn pattern_rank(pattern: &str) -> usize {
    ["seq32", "scat32", "all"]
        .iter()
        .position(|p| *p == pattern)
        .unwrap_or(3)
}

/// Resume to working set: a bar per cache state and mode, a group per
/// guest size and pattern.
pub fn resume_chart(records: &[Record]) -> Option<BarChart> {
    // (size, pattern rank, pattern) -> series label -> ns
    let mut cells: BTreeMap<(u64, usize, String), BTreeMap<String, f64>> = BTreeMap::new();
    let mut labels: Vec<(usize, String)> = Vec::new();
    for r in records {
        let cache = match r.group.as_str() {
            "resume_ws" => "hot",
            "resume_ws_cold" => "cold",
            _ => continue,
        };
        let [size, pattern, mode] = r.parts.as_slice() else {
            continue;
        };
        let Some(size) = mib(size) else { continue };
        let label = format!("{cache} cache, {mode}");
        let rank = (cache == "cold") as usize * 10 + (mode != "lazy") as usize;
        if !labels.iter().any(|(_, l)| *l == label) {
            labels.push((rank, label.clone()));
        }
        cells
            .entry((size as u64, pattern_rank(pattern), pattern.clone()))
            .or_default()
            .insert(label, r.median_ns);
    }
    if cells.is_empty() {
        return None;
    }
    labels.sort();
    let max = cells
        .values()
        .flat_map(|c| c.values())
        .fold(0.0, |a, b| b.max(a));
    let (unit, scale) = time_unit(max);
    let categories = cells
        .keys()
        .map(|(size, _, pattern)| format!("{size} MiB\n{pattern}"))
        .collect();
    let series = labels
        .into_iter()
        .map(|(_, label)| BarSeries {
            values: cells
                .values()
                .map(|c| c.get(&label).map(|ns| ns / scale))
                .collect(),
            label,
        })
        .collect();
    Some(BarChart {
        title: "Resume until the guest touched its working set".to_string(),
        x_label: "guest memory and working set (seq32, scat32: 32 MiB; all: every page)"
            .to_string(),
        y_label: format!("restore to working set, median ({unit})"),
        caption: CAPTION.to_string(),
        categories,
        series,
    })
}

/// A chart, ready to write.
pub struct Chart {
    pub file: &'static str,
    pub svg: String,
}

/// Every chart the records allow; for each one they do not, a message.
pub fn make_charts(records: &[Record]) -> (Vec<Chart>, Vec<String>) {
    let mut charts = Vec::new();
    let mut skipped = Vec::new();
    let mut add = |file: &'static str, svg: Option<String>, needs: &str| match svg {
        Some(svg) => charts.push(Chart { file, svg }),
        None => skipped.push(format!("{file}: no {needs} results")),
    };
    add(
        "restore_latency.svg",
        restore_chart(records).map(|c| c.to_svg()),
        "snapshot_restore, floor_restore or restore_call (benches/snapshot.rs, benches/resume.rs)",
    );
    add(
        "diff_cost.svg",
        diff_chart(records).map(|c| c.to_svg()),
        "diff_create or diff_harvest (benches/diff.rs)",
    );
    add(
        "resume_ws.svg",
        resume_chart(records).map(|c| c.to_svg()),
        "resume_ws or resume_ws_cold (benches/resume.rs)",
    );
    (charts, skipped)
}

/// `cargo xtask charts`: returns the exit code (0 even when charts are
/// skipped for want of data).
pub fn charts() -> Result<i32> {
    let from = crate::tasks::criterion_rig_dir();
    let out = util::workspace_root().join("docs/charts");
    if !from.is_dir() {
        util::say(format!(
            "charts: no criterion results in {}: run `cargo xtask bench` (or \
             `DORMOUSE_BENCH_ONLY=snapshot,diff,resume cargo xtask bench`) first; no chart written",
            from.display()
        ));
        return Ok(0);
    }
    let (records, problems) = read_records(&from)?;
    for problem in &problems {
        util::warn(format!("charts: skipped a result: {problem}"));
    }
    util::say(format!(
        "charts: {} benchmark results in {}",
        records.len(),
        from.display()
    ));
    let (charts, skipped) = make_charts(&records);
    if !charts.is_empty() {
        util::mkdir(&out)?;
    }
    for chart in &charts {
        let path = out.join(chart.file);
        std::fs::write(&path, &chart.svg).context(|| format!("cannot write {}", path.display()))?;
        util::say(format!("charts: wrote {}", path.display()));
    }
    for skip in &skipped {
        util::say(format!(
            "charts: skipped {skip} in {} (an existing chart is kept)",
            from.display()
        ));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, ms: f64) -> Record {
        let mut parts = id.split('/').map(str::to_string);
        Record {
            group: parts.next().unwrap(),
            parts: parts.collect(),
            median_ns: ms * 1e6,
        }
    }

    /// Writes a criterion-like `<dir>/new/` with the two files.
    fn write_bench(root: &Path, dir: &str, benchmark: &str, median: &str) {
        let new = root.join(dir).join("new");
        util::mkdir(&new).unwrap();
        std::fs::write(new.join("benchmark.json"), benchmark).unwrap();
        let estimates = format!(
            r#"{{"mean":{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":3.0}},"point_estimate":2.0,"standard_error":0.1}},"median":{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":1.0,"upper_bound":3.0}},"point_estimate":{median},"standard_error":0.1}},"median_abs_dev":{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":0.0,"upper_bound":1.0}},"point_estimate":0.5,"standard_error":0.1}},"slope":null,"std_dev":{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":0.0,"upper_bound":1.0}},"point_estimate":0.5,"standard_error":0.1}}}}"#
        );
        std::fs::write(new.join("estimates.json"), estimates).unwrap();
    }

    #[test]
    fn reads_criterion_tree() {
        let root = std::env::temp_dir().join(format!("xtask-charts-{}", std::process::id()));
        util::remove_all(&root).unwrap();
        write_bench(
            &root,
            "resume_ws/1024MiB_seq32/lazy",
            r#"{"group_id":"resume_ws","function_id":"1024MiB/seq32","value_str":"lazy","throughput":null,"full_id":"resume_ws/1024MiB/seq32/lazy","directory_name":"resume_ws/1024MiB_seq32/lazy","title":"resume_ws/1024MiB/seq32/lazy"}"#,
            "1500000.5",
        );
        write_bench(
            &root,
            "snapshot_restore/128MiB",
            r#"{"group_id":"snapshot_restore","function_id":null,"value_str":"128MiB","throughput":null,"full_id":"snapshot_restore/128MiB","directory_name":"snapshot_restore/128MiB","title":"snapshot_restore/128MiB"}"#,
            "2000",
        );
        // Broken ones are reported, not fatal.
        write_bench(&root, "broken/x", "{not json", "1");
        write_bench(&root, "nomedian/x", r#"{"group_id":"g"}"#, "null");
        // criterion's report pages and base/ copies are not results.
        write_bench(&root, "report/x", r#"{"group_id":"report"}"#, "1");
        let base = root.join("snapshot_restore/128MiB/base");
        util::mkdir(&base).unwrap();
        std::fs::write(base.join("benchmark.json"), "{}").unwrap();

        let (records, problems) = read_records(&root).unwrap();
        assert_eq!(
            records,
            [
                Record {
                    group: "resume_ws".into(),
                    parts: vec!["1024MiB".into(), "seq32".into(), "lazy".into()],
                    median_ns: 1500000.5,
                },
                Record {
                    group: "snapshot_restore".into(),
                    parts: vec!["128MiB".into()],
                    median_ns: 2000.0,
                },
            ]
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("is not JSON")));
        assert!(problems
            .iter()
            .any(|p| p.contains("no usable median.point_estimate")));
        util::remove_all(&root).unwrap();
    }

    #[test]
    fn units() {
        assert_eq!(time_unit(999.0), ("ns", 1.0));
        assert_eq!(time_unit(25_000.0), ("µs", 1e3));
        assert_eq!(time_unit(3e8), ("ms", 1e6));
        assert_eq!(time_unit(2e9), ("s", 1e9));
    }

    #[test]
    fn restore_series() {
        let records = [
            record("floor_restore/128MiB", 1.0),
            record("floor_restore/1024MiB", 2.0),
            record("restore_call/256MiB/lazy", 5.0),
            record("restore_call/256MiB/prefetch", 9.0),
            record("snapshot_restore/128MiB", 3.0),
            record("snapshot_restore/1024MiB", 4.0),
            record("snapshot_create/128MiB", 99.0),
        ];
        let chart = restore_chart(&records).unwrap();
        assert_eq!(chart.y_label, "restore latency, median (ms)");
        let got: Vec<(&str, Vec<(f64, f64)>)> = chart
            .series
            .iter()
            .map(|s| (s.label.as_str(), s.points.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "floor_restore (no dormouse)",
                    vec![(128.0, 1.0), (1024.0, 2.0)]
                ),
                ("restore_call, lazy", vec![(256.0, 5.0)]),
                ("restore_call, prefetch", vec![(256.0, 9.0)]),
                ("snapshot_restore", vec![(128.0, 3.0), (1024.0, 4.0)]),
            ]
        );
        assert!(chart
            .caption
            .starts_with("emulated arm64 host (QEMU TCG), ratios only"));
        assert_eq!(restore_chart(&[record("boot/x", 1.0)]), None);
    }

    #[test]
    fn diff_series() {
        let records = [
            record("diff_create/256MiB/1pct", 2.0),
            record("diff_create/256MiB/100pct", 50.0),
            record("diff_create/1024MiB/10pct", 30.0),
            record("diff_harvest/256MiB", 1.0),
            record("diff_create/1024MiB/junkpct", 1.0),
            record("chain_restore/2layers", 1.0),
        ];
        let chart = diff_chart(&records).unwrap();
        assert_eq!(chart.series.len(), 2);
        assert_eq!(chart.series[0].label, "256 MiB guest");
        // (256 * 256 - 2) pages; 1% and 100% of them, harvest at 0.
        assert_eq!(
            chart.series[0].points,
            [(655.0, 2.0), (65534.0, 50.0), (0.0, 1.0)]
        );
        assert_eq!(chart.series[1].label, "1024 MiB guest");
        assert_eq!(chart.series[1].points, [(26214.0, 30.0)]);
        assert_eq!(diff_chart(&records[5..]), None);
    }

    #[test]
    fn resume_bars() {
        let records = [
            record("resume_ws/1024MiB/all/lazy", 40.0),
            record("resume_ws/1024MiB/all/prefetch", 20.0),
            record("resume_ws/256MiB/scat32/lazy", 8.0),
            record("resume_ws/256MiB/seq32/lazy", 6.0),
            record("resume_ws/256MiB/seq32/prefetch", 3.0),
            record("resume_ws_cold/256MiB/seq32/prefetch", 12.0),
            record("resume_ws_cold/256MiB/seq32/lazy", 30.0),
            record("restore_call/256MiB/lazy", 1.0),
        ];
        let chart = resume_chart(&records).unwrap();
        assert_eq!(
            chart.categories,
            ["256 MiB\nseq32", "256 MiB\nscat32", "1024 MiB\nall"]
        );
        let got: Vec<(&str, Vec<Option<f64>>)> = chart
            .series
            .iter()
            .map(|s| (s.label.as_str(), s.values.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("hot cache, lazy", vec![Some(6.0), Some(8.0), Some(40.0)]),
                ("hot cache, prefetch", vec![Some(3.0), None, Some(20.0)]),
                ("cold cache, lazy", vec![Some(30.0), None, None]),
                ("cold cache, prefetch", vec![Some(12.0), None, None]),
            ]
        );
        assert_eq!(resume_chart(&records[7..]), None);
    }

    /// A run of one cheap bench (rate_limiter) makes no chart: each is
    /// skipped with the benches that would feed it.
    #[test]
    fn missing_groups_are_skipped() {
        let (charts, skipped) = make_charts(&[record("token_bucket/consume", 0.001)]);
        assert!(charts.is_empty());
        assert_eq!(skipped.len(), 3);
        assert!(skipped[0].starts_with("restore_latency.svg: no snapshot_restore"));
        assert!(skipped[2].contains("resume_ws_cold"));

        let (charts, skipped) = make_charts(&[record("resume_ws/256MiB/seq32/lazy", 1.0)]);
        assert_eq!(charts.len(), 1);
        assert_eq!(charts[0].file, "resume_ws.svg");
        assert!(charts[0].svg.contains("hot cache, lazy"));
        assert_eq!(skipped.len(), 2);
    }
}
