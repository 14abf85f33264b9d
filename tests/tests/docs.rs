//! The documentation stays true to the code.

use std::path::PathBuf;

fn doc(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn configuration_doc_matches_code() {
    let text = doc("configuration.md");
    let table = llumlet::env::markdown_table();
    assert!(
        text.contains(&table),
        "docs/configuration.md does not carry the variable table of the code; regenerate it with \
         `llumlet env --markdown`.\nExpected:\n{table}"
    );
    // And no variable row in the document that the code does not know.
    for line in text.lines().filter(|l| l.starts_with("| `")) {
        let name = line.trim_start_matches("| `").split('`').next().unwrap();
        assert!(
            llumlet::env::find(name).is_some(),
            "docs/configuration.md lists unknown variable {name}"
        );
    }
}
