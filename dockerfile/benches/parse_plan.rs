//! Parse + plan throughput on the official-images corpus: `cargo bench -p ossb-dockerfile`.
//! Prints MB/s and files/s for parsing alone and for parse + plan.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ossb_dockerfile::{parse, plan, PlanOptions};

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            collect(&p, out);
        } else if p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("Dockerfile"))
        {
            out.push(p);
        }
    }
}

fn measure(name: &str, files: &[(String, String)], f: impl Fn(&str, &str)) {
    let bytes: usize = files.iter().map(|(_, s)| s.len()).sum();
    let mut rounds = 0u32;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        for (n, s) in files {
            f(s, n);
        }
        rounds += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let mb = bytes as f64 * f64::from(rounds) / 1e6 / secs;
    let fps = files.len() as f64 * f64::from(rounds) / secs;
    println!(
        "{name}: {} files, {bytes} bytes, {rounds} rounds: {mb:.1} MB/s, {fps:.0} files/s",
        files.len()
    );
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/official-images");
    let mut paths = Vec::new();
    collect(&root, &mut paths);
    let files: Vec<(String, String)> = paths
        .iter()
        .map(|p| (p.display().to_string(), fs::read_to_string(p).unwrap()))
        .collect();
    let opts = PlanOptions::default();
    let bases = HashMap::new();
    measure("parse", &files, |s, n| {
        std::hint::black_box(parse(s, n).unwrap());
    });
    measure("parse+plan", &files, |s, n| {
        let df = parse(s, n).unwrap();
        std::hint::black_box(plan(&df, &opts, &bases).unwrap());
    });
}
