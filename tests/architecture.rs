//! The shape of `src/` that issue 7 set out, kept by tests: no import cycle among the top-level
//! modules, and no production file (the part above its `#[cfg(test)]` tests) much over 500 lines.
//! Both read the source files as text; neither builds anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest production part a file may have (issue 7: "about 500 lines").
const MAX_PRODUCTION_LINES: usize = 550;

/// Files exempt from the size rule, with the reason.
const LONG_FILES: &[(&str, &str)] = &[(
    "src/testkit.rs",
    "test code: builders for unit tests, integration tests and benches (feature `testkit`)",
)];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's text above its first `#[cfg(test)]` line, without `//` comments.
fn production(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect()
}

fn src_files() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            (rel, std::fs::read_to_string(&p).expect("read source"))
        })
        .collect()
}

/// `src/a/b.rs` and `src/a.rs` belong to module `a`; `lib.rs` and `main.rs` to none.
fn top_module(rel: &str) -> Option<String> {
    let first = rel.strip_prefix("src/")?.split('/').next()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

/// The top-level modules a piece of code names through `crate::`.
fn uses(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end]
                .split(',')
                .map(|s| s.trim().split("::").next().unwrap_or(""))
                .collect()
        } else {
            vec![
                rest.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or(""),
            ]
        };
        for n in names {
            if !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                out.insert(n.to_owned());
            }
        }
    }
    out
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            for w in self.edges.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.stack.contains(&w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                while let Some(w) = self.stack.pop() {
                    comp.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

#[test]
fn no_import_cycle_among_the_top_level_modules() {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    // (from, to) → the files that make the edge, for the failure message.
    let mut why: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (rel, text) in src_files() {
        let Some(from) = top_module(&rel) else {
            continue;
        };
        let code = production(&text).join("\n");
        for to in uses(&code) {
            if to != from {
                edges.entry(from.clone()).or_default().insert(to.clone());
                why.entry((from.clone(), to)).or_default().push(rel.clone());
            }
        }
    }
    assert!(edges.len() > 10, "the module graph was not read: {edges:?}");
    let found = cycles(&edges);
    let mut report = String::new();
    for comp in &found {
        report.push_str(&format!("cycle among {comp:?}:\n"));
        for ((a, b), files) in &why {
            if comp.contains(a) && comp.contains(b) {
                report.push_str(&format!("  {a} -> {b}  ({})\n", files.join(", ")));
            }
        }
    }
    assert!(found.is_empty(), "{report}");
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    // The check above can fail: a → b → c → a is reported, d is not part of it.
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        edges.entry(a.into()).or_default().insert(b.into());
    }
    assert_eq!(cycles(&edges), vec![vec!["a", "b", "c"]]);
    assert_eq!(
        uses("use crate::{x, y::Z};\nlet v = crate::w::f();"),
        ["w", "x", "y"]
            .into_iter()
            .map(String::from)
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(
        production("fn a() {} // crate::b\n#[cfg(test)]\nmod tests {}"),
        vec!["fn a() {} "]
    );
}

#[test]
fn no_production_file_is_much_over_500_lines() {
    let mut long = Vec::new();
    for (rel, text) in src_files() {
        if LONG_FILES.iter().any(|(f, _)| *f == rel) {
            continue;
        }
        let n = production(&text).len();
        if n > MAX_PRODUCTION_LINES {
            long.push(format!("{rel}: {n} lines above its tests"));
        }
    }
    assert!(
        long.is_empty(),
        "split these by concern (limit {MAX_PRODUCTION_LINES}):\n{}",
        long.join("\n")
    );
}
