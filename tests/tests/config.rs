//! Configuration as code against a running mesh: nodes publish their
//! labels and facts, and `trellis config plan` resolves a fleet directory
//! for exactly the nodes the manifests select.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use trellis_tests::{Mesh, eventually, fleet_site, get_json, run, serial};

const REGION: &str = "eu";
const SITE: &str = "par";

/// Node name → the paths the plan adds for it.
fn added_by_node(plan: &Value) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for site in plan["sites"].as_array().expect("sites") {
        for group in site["groups"].as_array().expect("groups") {
            assert_eq!(group["change"]["outcome"], "changes", "{group}");
            let added: Vec<String> = group["change"]["added"]
                .as_array()
                .expect("added")
                .iter()
                .map(|p| p.as_str().expect("path").to_owned())
                .collect();
            for n in group["nodes"].as_array().expect("nodes") {
                out.insert(n.as_str().expect("name").to_owned(), added.clone());
            }
        }
    }
    out
}

#[test]
fn the_plan_selects_exactly_the_labelled_nodes_and_names_a_conflict() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", REGION, "", "hub-1");
    mesh.issue("relay", REGION, SITE, "par-relay");
    let (_hub, uplink, api) = mesh.start_hub("hub-1", "");
    let (_relay, relay_gossip) = mesh.start_relay("par-relay", &uplink, "");
    let roles = ["web", "web", "db", "db"];
    let mut nodes = Vec::new();
    for (i, role) in roles.iter().enumerate() {
        let name = format!("par-n{i}");
        mesh.issue("node", REGION, SITE, &name);
        let state = mesh.path().join(format!("{name}/config"));
        let extra = format!(
            "[node]\nlabels = {{ role = \"{role}\", rack = \"r{i}\" }}\n[config]\nstate_dir = {state:?}\n"
        );
        nodes.push(mesh.start_node(&name, &relay_gossip, &extra).0);
    }
    let all_alive = eventually(Duration::from_secs(30), || {
        fleet_site(&api, SITE).is_some_and(|(_, r)| r["nodes_alive"] == roles.len())
    });
    assert!(all_alive, "the site never showed every node alive");

    // The relay hands on what the nodes publish about themselves.
    let listed = get_json(&format!("{api}/api/v1/sites/{SITE}/nodes")).expect("nodes");
    let n0 = listed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "par-n0")
        .expect("par-n0 listed");
    assert_eq!(n0["labels"]["role"], "web", "{n0}");
    assert_eq!(n0["facts"]["os"], std::env::consts::OS, "{n0}");

    let root = mesh.path().join("managed");
    let fleet = mesh.path().join("fleet");
    // `trellis config plan` of the fleet directory at this hub, with `extra`.
    let config_plan = |extra: &[&str]| {
        let mut args = vec!["config", "plan", fleet.to_str().unwrap(), "--hub", &api];
        args.extend_from_slice(extra);
        run("trellis", &args)
    };
    std::fs::create_dir_all(&fleet).unwrap();
    std::fs::write(
        fleet.join("base.toml"),
        format!(
            "[[file]]\npath = {:?}\ncontent = \"managed by trellis\\n\"\n",
            root.join("motd").to_str().unwrap()
        ),
    )
    .unwrap();
    std::fs::write(
        fleet.join("web.toml"),
        format!(
            "[[vars]]\nselector = {{ labels = {{ role = \"web\" }} }}\nvalues = {{ port = \"8080\" }}\n\n\
             [[file]]\npath = {:?}\ncontent = \"listen {{{{port}}}} on {{{{node.name}}}} in {{{{label.rack}}}}\\n\"\n\
             reload = [\"true\"]\nselector = {{ labels = {{ role = \"web\" }} }}\n",
            root.join("web.conf").to_str().unwrap()
        ),
    )
    .unwrap();

    let out = config_plan(&["--json"]);
    assert!(out.status.success(), "config plan: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["unlisted_sites"], Value::Array(vec![]), "{v}");
    let plan = &v["plan"];
    assert_eq!(plan["nodes"], 4, "{plan}");
    assert_eq!(plan["changing"], 4, "{plan}");
    assert_eq!(plan["failing"], 0, "{plan}");
    let motd = root.join("motd").to_str().unwrap().to_owned();
    let web = root.join("web.conf").to_str().unwrap().to_owned();
    let mut both = vec![motd.clone(), web.clone()];
    both.sort();
    let expected: BTreeMap<String, Vec<String>> = [
        ("par-n0".to_owned(), both.clone()),
        ("par-n1".to_owned(), both),
        ("par-n2".to_owned(), vec![motd.clone()]),
        ("par-n3".to_owned(), vec![motd]),
    ]
    .into();
    assert_eq!(added_by_node(plan), expected, "{plan}");

    // The human form says the same, by site.
    let out = config_plan(&[]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("4 of 4 nodes change"), "{text}");
    assert!(text.contains(&web), "{text}");

    // Two manifests defining the same file for the same nodes at the same
    // specificity: the plan names both and exits 1.
    std::fs::write(
        fleet.join("web-again.toml"),
        format!(
            "[[file]]\npath = {:?}\ncontent = \"other\\n\"\nselector = {{ labels = {{ role = \"web\" }} }}\n",
            root.join("web.conf").to_str().unwrap()
        ),
    )
    .unwrap();
    let out = config_plan(&["--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["plan"]["failing"], 2, "{v}");
    let text = v.to_string();
    assert!(
        text.contains("web.toml") && text.contains("web-again.toml"),
        "the conflict names both manifests: {text}"
    );

    // A broken manifest is bad input: exit 2 with the file named.
    std::fs::write(fleet.join("broken.toml"), "[[file]]\npath = 3\n").unwrap();
    let out = config_plan(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("broken.toml"),
        "{out:?}"
    );
    // Nothing was written on any node by planning.
    assert!(!root.exists(), "plan must not touch nodes");
}
