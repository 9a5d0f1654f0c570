//! The configuration table people read lists exactly the variables of
//! [`crac_protocol::env`]: one row per `CRAC_*` variable, no more, no fewer.

use std::collections::BTreeSet;
use std::path::Path;

/// The `CRAC_*` names in the first column of the first table after the "Configuration"
/// heading of `text`, if it has one.
fn configuration_table(text: &str) -> Option<Vec<String>> {
    let mut lines = text.lines();
    lines.find(|line| {
        line.starts_with('#') && line.trim_start_matches('#').trim() == "Configuration"
    })?;
    let rows: Vec<String> = lines
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .filter_map(|row| {
            let first = row.trim_start_matches('|').split('|').next()?.trim();
            let name = first.trim_matches('`');
            name.starts_with("CRAC_").then(|| name.to_owned())
        })
        .collect();
    Some(rows)
}

#[test]
fn the_configuration_table_lists_every_crac_variable_once() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // The table lives in docs/configuration.md once the docs have their folder, in the
    // README before.
    let (file, rows) = ["docs/configuration.md", "README.md"]
        .iter()
        .find_map(|name| {
            let text = std::fs::read_to_string(root.join(name)).ok()?;
            configuration_table(&text).map(|rows| (*name, rows))
        })
        .expect("a \"Configuration\" heading with a table in docs/configuration.md or README.md");
    let listed: BTreeSet<&str> = rows.iter().map(String::as_str).collect();
    assert_eq!(
        listed.len(),
        rows.len(),
        "a variable listed twice in {file}: {rows:?}"
    );
    let defined: BTreeSet<&str> = crac_protocol::env::ALL.iter().copied().collect();
    assert_eq!(
        defined.len(),
        crac_protocol::env::ALL.len(),
        "a variable twice in env::ALL"
    );
    assert_eq!(
        listed, defined,
        "{file}'s configuration table and crac_protocol::env differ"
    );
}
