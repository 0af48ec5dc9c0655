//! The README stays true to the binary: its capability table is generated from the stores'
//! `capabilities()`, and its configuration table names every `switchboard serve` flag.

use switchboard_core::Capabilities;

#[test]
fn the_readme_capability_table_matches_the_compiled_stores() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md is readable");
    let begin = "<!-- capabilities:begin -->\n";
    let end = "<!-- capabilities:end -->";
    let start = readme.find(begin).expect("README has the begin marker") + begin.len();
    let stop = readme[start..]
        .find(end)
        .expect("README has the end marker")
        + start;
    let expected = Capabilities::markdown_table(&switchboard::stores::compiled());
    assert_eq!(
        &readme[start..stop],
        expected,
        "the README capability table is stale: replace it with the output of \
         `cargo run -p switchboard --all-features -- capabilities`"
    );
}

#[test]
fn every_serve_flag_is_in_the_readme_configuration_table() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md is readable");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--help"])
        .output()
        .expect("switchboard serve --help runs");
    assert!(help.status.success(), "serve --help failed");
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("--"))
        .map(|flag| flag.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-')))
        .filter(|flag| !flag.is_empty() && *flag != "help")
        .collect();
    assert!(
        flags.len() > 20,
        "parsed too few flags from --help: {flags:?}"
    );
    let missing: Vec<&&str> = flags
        .iter()
        .filter(|flag| !readme.contains(&format!("| `--{flag}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "flags of `switchboard serve` missing from the README configuration table: {missing:?}"
    );
}
