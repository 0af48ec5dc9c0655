//! The README's capability table is generated from the stores' `capabilities()`; this test
//! fails when the two drift apart.

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
