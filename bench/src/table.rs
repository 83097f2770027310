//! Markdown tables of medians over rounds, from the JSON lines `herald-bench run --json-out` appends.

use std::collections::BTreeMap;

use anyhow::Context;
use serde_json::Value;

/// One metric of the table: its name, where it is in a report, whether higher is better, and its format.
struct Metric {
    name: &'static str,
    get: fn(&Value) -> Option<f64>,
    /// Shown only for workloads where it means something.
    applies: fn(&Value) -> bool,
    decimals: usize,
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    let mut v = v;
    for p in path {
        v = v.get(p)?;
    }
    v.as_f64()
}

fn has_deliveries(v: &Value) -> bool {
    f(v, &["subscribers"]).unwrap_or(0.0) > 0.0 && f(v, &["messages"]).unwrap_or(0.0) > 0.0
}

fn has_publishes(v: &Value) -> bool {
    f(v, &["messages"]).unwrap_or(0.0) > 0.0
}

fn has_conns(v: &Value) -> bool {
    f(v, &["subscribers"]).unwrap_or(0.0) >= 1000.0
}

fn has_search(v: &Value) -> bool {
    v.get("rate_search").is_some_and(|r| !r.is_null())
}

const METRICS: &[Metric] = &[
    Metric {
        name: "sustained deliveries/s (rate search, p99 under the bound)",
        get: |v| f(v, &["rate_search", "sustained_deliveries_per_sec"]),
        applies: has_search,
        decimals: 0,
    },
    Metric {
        name: "sustained publish rate msg/s",
        get: |v| f(v, &["rate_search", "sustained_rate"]),
        applies: has_search,
        decimals: 0,
    },
    Metric {
        name: "deliveries/s",
        get: |v| f(v, &["deliveries_per_sec"]),
        applies: has_deliveries,
        decimals: 0,
    },
    Metric {
        name: "latency p50 ms",
        get: |v| f(v, &["latency_ms", "p50"]),
        applies: has_deliveries,
        decimals: 2,
    },
    Metric {
        name: "latency p90 ms",
        get: |v| f(v, &["latency_ms", "p90"]),
        applies: has_deliveries,
        decimals: 2,
    },
    Metric {
        name: "latency p99 ms",
        get: |v| f(v, &["latency_ms", "p99"]),
        applies: has_deliveries,
        decimals: 2,
    },
    Metric {
        name: "latency p99.9 ms",
        get: |v| f(v, &["latency_ms", "p999"]),
        applies: has_deliveries,
        decimals: 2,
    },
    Metric {
        name: "latency max ms",
        get: |v| f(v, &["latency_ms", "max"]),
        applies: has_deliveries,
        decimals: 2,
    },
    Metric {
        name: "reach-all p50 ms",
        get: |v| f(v, &["reach_all_ms", "p50"]),
        applies: has_deliveries,
        decimals: 2,
    },
    Metric {
        name: "reach-all p99 ms",
        get: |v| f(v, &["reach_all_ms", "p99"]),
        applies: has_deliveries,
        decimals: 2,
    },
    Metric {
        name: "WebSocket bytes received per delivery",
        get: |v| f(v, &["ws_bytes_per_delivery"]),
        applies: |v| {
            has_deliveries(v) && v.get("ws_bytes_per_delivery").is_some_and(|b| !b.is_null())
        },
        decimals: 1,
    },
    Metric {
        name: "publishes/s (acked)",
        get: |v| f(v, &["publishes_per_sec"]),
        applies: has_publishes,
        decimals: 0,
    },
    Metric {
        name: "publish ack p99 ms",
        get: |v| f(v, &["publish_ack_ms", "p99"]),
        applies: has_publishes,
        decimals: 2,
    },
    Metric {
        name: "RSS per connection B",
        get: |v| f(v, &["rss_per_conn_bytes"]),
        applies: has_conns,
        decimals: 0,
    },
    Metric {
        name: "server CPU while idle, % of a core",
        get: |v| f(v, &["idle_cpu_percent"]),
        applies: |v| has_conns(v) && v.get("idle_cpu_percent").is_some_and(|c| !c.is_null()),
        decimals: 2,
    },
    Metric {
        name: "RSS under load MiB",
        get: |v| f(v, &["rss_kib", "load"]).map(|k| k / 1024.0),
        applies: has_conns,
        decimals: 1,
    },
];

fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

fn fmt(x: Option<f64>, decimals: usize) -> String {
    match x {
        Some(x) => format!("{x:.decimals$}"),
        None => "–".into(),
    }
}

/// The table: one row per (workload, metric), medians for Herald and nchan, and Herald/nchan.
pub fn markdown(jsonl: &str) -> anyhow::Result<String> {
    // label -> server -> reports, in the order labels first appear.
    let mut order: Vec<String> = Vec::new();
    let mut by: BTreeMap<String, BTreeMap<String, Vec<Value>>> = BTreeMap::new();
    for (n, line) in jsonl
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line).with_context(|| format!("line {}", n + 1))?;
        let label = v["label"].as_str().unwrap_or("").to_string();
        let server = v["server"].as_str().unwrap_or("").to_string();
        if !by.contains_key(&label) {
            order.push(label.clone());
        }
        by.entry(label)
            .or_default()
            .entry(server)
            .or_default()
            .push(v);
    }
    let mut out = String::new();
    out.push_str(
        "| workload | metric | Herald | nchan | Herald/nchan |\n|---|---|---:|---:|---:|\n",
    );
    for label in &order {
        let servers = &by[label];
        let empty = Vec::new();
        let h = servers.get("herald").unwrap_or(&empty);
        let n = servers.get("nchan").unwrap_or(&empty);
        let Some(sample) = h.first().or(n.first()) else {
            continue;
        };
        for m in METRICS.iter().filter(|m| (m.applies)(sample)) {
            let mh = median(h.iter().filter_map(|v| (m.get)(v)).collect());
            let mn = median(n.iter().filter_map(|v| (m.get)(v)).collect());
            let ratio = match (mh, mn) {
                (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
                _ => "–".into(),
            };
            out.push_str(&format!(
                "| {label} | {} | {} | {} | {ratio} |\n",
                m.name,
                fmt(mh, m.decimals),
                fmt(mn, m.decimals)
            ));
        }
        let integrity = |rs: &[Value]| -> String {
            if rs.is_empty() {
                return "–".into();
            }
            let sum = |k: &str| rs.iter().map(|v| v[k].as_u64().unwrap_or(0)).sum::<u64>();
            let clean = rs
                .iter()
                .filter(|v| v["clean"].as_bool() == Some(true))
                .count();
            format!(
                "{clean}/{} clean; lost {} dup {}",
                rs.len(),
                sum("lost"),
                sum("duplicated")
            )
        };
        out.push_str(&format!(
            "| {label} | rounds, lost, duplicated | {} | {} | |\n",
            integrity(h),
            integrity(n)
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_search_rows_use_the_sustained_figures() {
        let line = |server: &str, sustained: f64| {
            format!(
                r#"{{"label":"search","server":"{server}","subscribers":1000,"messages":10,"deliveries_per_sec":1,"rate_search":{{"sustained_deliveries_per_sec":{sustained},"sustained_rate":{}}},"lost":0,"duplicated":0,"clean":true}}"#,
                sustained / 1000.0
            )
        };
        let text = [line("herald", 400_000.0), line("nchan", 100_000.0)].join("\n");
        let t = markdown(&text).expect("table");
        assert!(
            t.contains("| search | sustained deliveries/s (rate search, p99 under the bound) | 400000 | 100000 | 4.00 |"),
            "{t}"
        );
        assert!(
            t.contains("| search | sustained publish rate msg/s | 400 | 100 | 4.00 |"),
            "{t}"
        );
    }

    #[test]
    fn medians_and_ratios() {
        let line = |server: &str, dps: f64, lost: u64| {
            format!(
                r#"{{"label":"1k sse","server":"{server}","subscribers":1000,"messages":10,"deliveries_per_sec":{dps},"lost":{lost},"duplicated":0,"clean":{}}}"#,
                lost == 0
            )
        };
        let text = [
            line("herald", 300.0, 0),
            line("nchan", 100.0, 0),
            line("herald", 100.0, 0),
            line("herald", 200.0, 2),
            line("nchan", 100.0, 0),
        ]
        .join("\n");
        let t = markdown(&text).expect("table");
        assert!(
            t.contains("| 1k sse | deliveries/s | 200 | 100 | 2.00 |"),
            "{t}"
        );
        assert!(t.contains("2/3 clean; lost 2 dup 0"), "{t}");
        assert!(!t.contains("sustained"), "no search, no search rows: {t}");
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![1.0, 3.0]), Some(2.0));
    }
}
