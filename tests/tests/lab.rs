//! The lab's short run: real BitTorrent clients (libtorrent, aria2c) in a swarm of real
//! peers and a private-tracker client among its own seeders, and real benign servers and
//! clients (look-alikes among them), through the agent on a gateway uplink with
//! softflowd as a second exporter. The truth is the lab's labels (which host runs what),
//! the clients' own record of their first payload byte, the uplink's interface counters,
//! and nfdump reading the agent's export.

use std::time::Duration;

use tests::lab::{self, LabConfig};

#[test]
#[ignore = "privileged: run by `cargo xtask test` as root"]
fn lab_scorecard_meets_its_targets() {
    if let Err(e) = lab::check_tools() {
        panic!("{e:#}");
    }
    let dir = tests::workspace_root().join("target/lab-test");
    let cfg = LabConfig {
        duration: Duration::from_secs(120),
        peers: 200,
        seed: 1,
        dir: dir.clone(),
        detector: tests::detector_bin(),
        scripts: tests::workspace_root().join("tests/lab"),
    };
    let card = lab::run(&cfg).unwrap_or_else(|e| panic!("the lab failed: {e:#}"));
    println!("{}", card.table());
    let path = tests::workspace_root().join("target/lab-scorecard.json");
    std::fs::write(&path, serde_json::to_string_pretty(&card.json).unwrap()).unwrap();
    let t = &card.json["targets"];
    assert_eq!(
        t["export_equals_interface"],
        true,
        "export totals differ:\n{}",
        card.table()
    );
    assert_eq!(
        t["zero_benign_alarmed"],
        true,
        "a benign host alarmed:\n{}",
        card.table()
    );
    assert_eq!(
        t["one_alarm_per_p2p_host"],
        true,
        "not one alarm per P2P host:\n{}",
        card.table()
    );
    assert_eq!(
        t["p2p_within_target"],
        true,
        "a P2P host was not alarmed in time:\n{}",
        card.table()
    );
    assert_eq!(
        t["p2p_kind_right"],
        true,
        "a BitTorrent host's alarm named another kind:\n{}",
        card.table()
    );
    assert_eq!(
        t["benign_margins_met"],
        true,
        "a benign host came within {} points of the threshold:\n{}",
        t["benign_margin_at_least"],
        card.table()
    );
    assert!(card.pass);
}
