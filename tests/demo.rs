//! The README's demo command keeps working: run it to the end against a private database.

mod common;

use std::process::Command;

use common::*;

#[test]
fn demo_delivers_its_messages_and_stops_cleanly() {
    let db = TestDb::new();
    let bin_dir = std::path::Path::new(DISPATCHER).parent().unwrap();
    let out = Command::new(project_root().join("scripts/demo.sh"))
        .arg("--once")
        .env("DEMO_DATABASE_URL", &db.url)
        .env("DEMO_ADMIN_URL", admin_url())
        .env("DEMO_BIN_DIR", bin_dir)
        .env("DEMO_PORT", free_port().to_string())
        .env("DEMO_SINK_PORT", free_port().to_string())
        .env("DEMO_MESSAGES", "12")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("sent=12 — all delivered"), "{stdout}");
    assert_eq!(db.count("sent"), 12);
    assert!(stderr.contains("Message batch processed"), "{stderr}");
    assert!(stderr.contains("Message dispatcher stopped"), "{stderr}");
}
