//! The documentation against the tree: the README quotes `examples/hello.rs` as it is,
//! ARCHITECTURE.md's layout table names every top-level folder and only those,
//! docs/configuration.md has a row for every `CRAC_*` variable the crates read, and the pages'
//! relative links lead to files and headings that exist.

use std::collections::BTreeSet;
use std::path::Path;

/// The repository's root: this crate is `examples/`.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn read(name: &str) -> String {
    std::fs::read_to_string(root().join(name)).unwrap_or_else(|e| panic!("cannot read {name}: {e}"))
}

#[test]
fn the_readme_quotes_hello_rs_verbatim() {
    let readme = read("README.md");
    let hello = read("examples/hello.rs");
    let block = format!("```rust\n{hello}```\n");
    assert!(
        readme.contains(&block),
        "README.md must quote examples/hello.rs whole, in a ```rust block: copy the file into it"
    );
}

#[test]
fn the_architecture_layout_table_matches_the_tree() {
    let architecture = read("ARCHITECTURE.md");
    let layout = architecture
        .split("\n## Layout\n")
        .nth(1)
        .expect("ARCHITECTURE.md has a `## Layout` section");
    // Rows look like "| `crac-core/` | role |".
    let in_table: BTreeSet<String> = layout
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once("/` |"))
        .map(|(name, _)| name.to_owned())
        .collect();
    assert!(
        in_table.contains("crac-core"),
        "no rows found in the layout table: {in_table:?}"
    );
    // Every folder at the top, hidden ones included; not git's own, nor the build's output.
    let in_tree: BTreeSet<String> = std::fs::read_dir(root())
        .unwrap()
        .map(|entry| entry.unwrap())
        .filter(|entry| entry.file_type().unwrap().is_dir())
        .map(|entry| entry.file_name().into_string().unwrap())
        .filter(|name| name != ".git" && name != "target")
        .collect();
    let missing: Vec<_> = in_tree.difference(&in_table).collect();
    let stale: Vec<_> = in_table.difference(&in_tree).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "ARCHITECTURE.md's layout table and the tree disagree: folders without a row {missing:?}, rows without a folder {stale:?}"
    );
    // Every workspace member has its row (members are top-level folders).
    let manifest = read("Cargo.toml");
    let members = manifest
        .split_once("members = [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .expect("Cargo.toml lists its members")
        .0;
    for member in members
        .split(',')
        .map(|m| m.trim().trim_matches('"'))
        .filter(|m| !m.is_empty())
    {
        assert!(
            in_table.contains(member),
            "workspace member {member} has no row in ARCHITECTURE.md's layout table"
        );
    }
}

/// Every `"CRAC_..."` string in the crates' sources.
fn variables_in(dir: &Path, found: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            variables_in(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for (start, _) in text.match_indices("\"CRAC_") {
                let name: String = text[start + 1..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                // `"CRAC_"` alone is a prefix test, not a variable.
                if name.len() > "CRAC_".len() {
                    found.insert(name);
                }
            }
        }
    }
}

#[test]
fn the_configuration_page_names_every_variable_the_crates_read() {
    let page = read("docs/configuration.md");
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(root()).unwrap() {
        let path = entry.unwrap().path();
        let is_crate = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("crac-");
        if is_crate && path.join("src").is_dir() {
            variables_in(&path.join("src"), &mut found);
        }
    }
    assert!(
        found.contains("CRAC_AGENT_DIR"),
        "no variables found: {found:?}"
    );
    // Test-only variables are named on the page as a family, the others each have a row.
    let missing: Vec<_> = found
        .iter()
        .filter(|name| {
            if name.starts_with("CRAC_TEST_") || name.starts_with("CRAC_RANDOM_") {
                false
            } else if name.contains("TEST") {
                !page.contains(&format!("`{name}`"))
            } else {
                !page.contains(&format!("| `{name}` |"))
            }
        })
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md has no row for {missing:?}: add one for each"
    );
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces as dashes.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// A page's text outside code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut in_block = false;
    text.lines()
        .filter(|line| {
            if line.starts_with("```") {
                in_block = !in_block;
                return false;
            }
            !in_block
        })
        .collect()
}

#[test]
fn relative_links_between_the_pages_lead_somewhere() {
    let mut pages = vec![
        "README.md".to_owned(),
        "ARCHITECTURE.md".to_owned(),
        "BENCHMARKS.md".to_owned(),
        "CHANGELOG.md".to_owned(),
    ];
    for entry in std::fs::read_dir(root().join("docs")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        pages.push(format!("docs/{name}"));
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = read(page);
        let dir = Path::new(page).parent().unwrap();
        for line in prose(&text) {
            for (start, _) in line.match_indices("](") {
                let Some((link, _)) = line[start + 2..].split_once(')') else {
                    continue;
                };
                if link.contains("://") || link.contains(' ') {
                    continue;
                }
                let (file, fragment) = link.split_once('#').unwrap_or((link, ""));
                let target = if file.is_empty() {
                    Path::new(page).to_path_buf()
                } else {
                    dir.join(file)
                };
                let Ok(target_text) = std::fs::read_to_string(root().join(&target)) else {
                    if !root().join(&target).exists() {
                        broken.push(format!("{page}: {link}"));
                    }
                    continue;
                };
                let headings: Vec<String> = prose(&target_text)
                    .into_iter()
                    .filter_map(|l| {
                        l.trim_start_matches('#')
                            .strip_prefix(' ')
                            .filter(|_| l.starts_with('#'))
                    })
                    .map(anchor)
                    .collect();
                if !fragment.is_empty() && !headings.iter().any(|h| h == fragment) {
                    broken.push(format!("{page}: {link} (no such heading)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "links that lead nowhere: {broken:#?}");
}
