//! The documentation against the tree: the README quotes `examples/hello.rs` as it is, and
//! ARCHITECTURE.md's layout table names every top-level folder, and only those.

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
