//! The shape of the source tree, as `docs/architecture.md` states it, kept checked: no two
//! files of `src/` import each other in a loop (directly or through others; a folder's
//! children may use what its `mod.rs` defines for them), and no module imports one of a
//! higher layer. An import is any path the code names (`use crate::…`,
//! `crate::x::y(…)`, `super::…`); unit-test modules (`#[cfg(test)] mod tests`) and comments
//! do not count. Reading the source text, not compiling it: a loop is a loop of files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first: a module may import its own layer's and lower layers' modules
/// only (a loop within a layer is caught by the loop check). Each top-level module of
/// `src/lib.rs` is in exactly one layer.
const LAYERS: &[&[&str]] = &[
    // Foundations: no seg imports below them.
    &["clock", "limiter", "certs", "syntax", "secrets"],
    &["config"],
    &["metrics", "directory", "http1"],
    &["audit", "fleet"],
    &["identity", "activesync", "revocation"],
    &["tls"],
    &["devices"],
    &["transport", "upstream", "kerberos", "policy"],
    &["proxy"],
    &["app", "mapcheck", "admin"],
    &["demo"],
];

/// Every source file of the library with its module path (`src/a/b.rs` is `a::b`).
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().and_then(|e| e.to_str()) != Some("rs") {
                continue;
            }
            let relative = path.strip_prefix(src).unwrap();
            let mut parts: Vec<String> = relative
                .iter()
                .map(|p| p.to_str().unwrap().trim_end_matches(".rs").to_string())
                .collect();
            match parts.last().map(String::as_str) {
                Some("main") if parts.len() == 1 => continue,
                Some("lib") if parts.len() == 1 => parts.clear(),
                Some("mod") => {
                    parts.pop();
                }
                _ => {}
            }
            out.insert(parts, path);
        }
    }
    out
}

/// The code of a file without comments and without its unit-test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut out = String::new();
    for line in text.lines() {
        let line = match line.find("//") {
            // A `//` inside a string literal (a URL) is not a comment: good enough for paths.
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The child modules a file declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn children(code: &str) -> Vec<String> {
    code.lines()
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("pub(crate) mod "))
                .or_else(|| line.strip_prefix("mod "))?;
            rest.strip_suffix(';').map(str::to_string)
        })
        .collect()
}

/// Every path named in `code` that starts at `crate`, `super`, `self` or one of the file's
/// own `children` (named relatively), expanded from `use` trees, as segments (a child's
/// path starts with `self`).
fn paths(code: &str, children: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let heads: Vec<(String, Vec<String>)> = ["crate", "super", "self"]
        .iter()
        .map(|h| (format!("{h}::"), vec![h.to_string()]))
        .chain(
            children
                .iter()
                .map(|c| (format!("{c}::"), vec!["self".to_string(), c.clone()])),
        )
        .collect();
    let mut i = 0;
    while i < bytes.len() {
        let start_ok = i == 0 || !(is_ident(bytes[i - 1]) || bytes[i - 1] == b':');
        let head = heads
            .iter()
            .find(|(h, _)| bytes[i..].starts_with(h.as_bytes()));
        match head {
            Some((h, root)) if start_ok => {
                let (trees, end) = tree(code, i + h.len());
                for tail in trees {
                    let mut path = root.clone();
                    path.extend(tail);
                    out.push(path);
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    out
}

/// Parses a path tail (`a::b::{c, d::e}`) at `at`: the expanded paths and where it ends.
fn tree(code: &str, mut at: usize) -> (Vec<Vec<String>>, usize) {
    let bytes = code.as_bytes();
    let mut prefix = Vec::new();
    loop {
        let start = at;
        while at < bytes.len() && (bytes[at].is_ascii_alphanumeric() || bytes[at] == b'_') {
            at += 1;
        }
        if at > start {
            prefix.push(code[start..at].to_string());
        }
        let group = if bytes[at..].starts_with(b"::{") {
            Some(3)
        } else if prefix.is_empty() && bytes[at..].starts_with(b"{") {
            Some(1)
        } else {
            None
        };
        if let Some(skip) = group {
            at += skip;
            let mut all = Vec::new();
            loop {
                while at < bytes.len() && (bytes[at] as char).is_whitespace() {
                    at += 1;
                }
                if at >= bytes.len() || bytes[at] == b'}' {
                    at += 1;
                    break;
                }
                let (inner, end) = tree(code, at);
                for tail in inner {
                    let mut path = prefix.clone();
                    path.extend(tail.into_iter().filter(|s| s != "self"));
                    all.push(path);
                }
                at = end;
                while at < bytes.len() && bytes[at] != b',' && bytes[at] != b'}' {
                    at += 1;
                }
                if at < bytes.len() && bytes[at] == b',' {
                    at += 1;
                }
            }
            return (all, at);
        }
        if bytes[at..].starts_with(b"::") && at + 2 < bytes.len() && bytes[at + 2] != b'*' {
            at += 2;
            continue;
        }
        return (vec![prefix], at);
    }
}

/// The module a path names, from the module `from`: its longest prefix that is a file.
fn resolve(
    path: &[String],
    from: &[String],
    known: &BTreeMap<Vec<String>, PathBuf>,
) -> Option<Vec<String>> {
    let mut absolute: Vec<String> = Vec::new();
    let mut rest: &[String];
    match path.first().map(String::as_str) {
        Some("crate") => rest = &path[1..],
        Some("self") => {
            absolute = from.to_vec();
            rest = &path[1..];
        }
        Some("super") => {
            // In `a/b.rs` (module a::b) and in `a/mod.rs` (module a) alike, super is the parent.
            absolute = from.to_vec();
            absolute.pop();
            rest = &path[1..];
            while rest.first().map(String::as_str) == Some("super") {
                absolute.pop();
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    absolute.extend(rest.iter().cloned());
    (0..=absolute.len())
        .rev()
        .map(|n| absolute[..n].to_vec())
        .find(|candidate| known.contains_key(candidate))
}

fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let known = modules(&src);
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &known {
        let text = std::fs::read_to_string(file).unwrap();
        let targets = edges.entry(module.clone()).or_default();
        let code = code(&text);
        for path in paths(&code, &children(&code)) {
            if let Some(target) = resolve(&path, module, &known) {
                // A folder's `mod.rs` is its face: it declares and re-exports its children,
                // which may use what it defines for the whole folder. A child naming its
                // face is not counted; anything else that comes back round is a loop. The
                // crate root only declares the modules.
                let ancestor = target.len() < module.len() && module.starts_with(&target);
                if &target != module && !target.is_empty() && !ancestor {
                    targets.insert(target);
                }
            }
        }
    }
    edges
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".into()
    } else {
        module.join("::")
    }
}

/// Strongly connected components of more than one module (Tarjan).
fn loops(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on_stack: BTreeSet<&'a Vec<String>>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Vec<String>) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        if let Some(targets) = s.edges.get(v) {
            for w in targets {
                let Some((w, _)) = s.edges.get_key_value(w) else {
                    continue;
                };
                if !s.index.contains_key(w) {
                    visit(s, w);
                    let low = s.low[w].min(s.low[v]);
                    s.low.insert(v, low);
                } else if s.on_stack.contains(w) {
                    let low = s.index[w].min(s.low[v]);
                    s.low.insert(v, low);
                }
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(name(w));
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut state = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    state.found
}

#[test]
fn no_two_files_import_each_other_in_a_loop() {
    let edges = graph();
    let found = loops(&edges);
    let described: Vec<String> = found
        .iter()
        .map(|component| {
            let members: BTreeSet<&String> = component.iter().collect();
            let ties: Vec<String> = edges
                .iter()
                .filter(|(from, _)| members.contains(&name(from)))
                .flat_map(|(from, targets)| {
                    targets
                        .iter()
                        .filter(|t| members.contains(&name(t)))
                        .map(move |t| format!("{} -> {}", name(from), name(t)))
                })
                .collect();
            format!("{}: {}", component.join(", "), ties.join("; "))
        })
        .collect();
    assert!(
        found.is_empty(),
        "import loops (see docs/architecture.md, \"The shape of the tree\"):\n{}",
        described.join("\n")
    );
}

#[test]
fn no_module_imports_a_higher_layer() {
    let edges = graph();
    let layer_of = |module: &[String]| -> Option<usize> {
        let top = module.first()?;
        LAYERS
            .iter()
            .position(|layer| layer.contains(&top.as_str()))
    };
    let tops: BTreeSet<&String> = edges.keys().filter_map(|m| m.first()).collect();
    let unplaced: Vec<&&String> = tops
        .iter()
        .filter(|t| layer_of(&[(**t).clone()]).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "top-level modules in no layer of tests/architecture.rs LAYERS: {unplaced:?}"
    );
    let mut upward = Vec::new();
    for (from, targets) in &edges {
        let Some(from_layer) = layer_of(from) else {
            continue;
        };
        for target in targets {
            if let Some(to_layer) = layer_of(target) {
                if to_layer > from_layer {
                    upward.push(format!("{} -> {}", name(from), name(target)));
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports from a lower layer to a higher one (docs/architecture.md):\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_reader_sees_use_trees_and_inline_paths() {
    let found = paths(
        "use crate::{a::B, c::{d::E, self}};\nlet x = crate::f::g(1);\nuse super::h::I;\nuse kid::J;\n",
        &["kid".to_string()],
    );
    let found: Vec<String> = found.iter().map(|p| p.join("::")).collect();
    assert_eq!(
        found,
        [
            "crate::a::B",
            "crate::c::d::E",
            "crate::c",
            "crate::f::g",
            "super::h::I",
            "self::kid::J"
        ]
    );
}

/// A bare machine builds seg: no crate in the build looks for a system library at build
/// time (bindgen and libclang, a pkg-config probe, a -sys crate for Kerberos). MIT's GSSAPI
/// is opened at run time instead (`src/kerberos/gss.rs`).
#[test]
fn no_build_script_probes_for_a_system_library() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["tree", "--edges", "normal,build", "--prefix", "none"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        crates.contains(&"libloading"),
        "the runtime loader is in the tree"
    );
    for probe in [
        "bindgen",
        "pkg-config",
        "clang-sys",
        "libgssapi",
        "libgssapi-sys",
        "system-deps",
    ] {
        assert!(!crates.contains(&probe), "{probe} is in the build: {tree}");
    }
}
