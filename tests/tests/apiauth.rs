//! The hub API's access control against a running hub that requires
//! tokens: each role reaches what it may and is refused the rest with a
//! clear answer, the `trellis` CLI passes its token, and a change made
//! with a token is attributed to the token's name in the management log,
//! whatever author the request claims.

use serde_json::Value;
use trellis_hub::apiauth::{ApiRole, ROUTES, required_role};
use trellis_tests::{Mesh, http_request, run, serial};

/// `(token, [[api.tokens]] entry)` from `trellis api token`.
fn token(name: &str, role: &str) -> (String, String) {
    let out = run(
        "trellis",
        &["api", "token", "--name", name, "--role", role, "--json"],
    );
    assert!(out.status.success(), "api token: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let e = &v["entry"];
    (
        v["token"].as_str().unwrap().to_owned(),
        format!(
            "[[api.tokens]]\nname = {}\nrole = {}\nsha256 = {}\n",
            e["name"], e["role"], e["sha256"]
        ),
    )
}

fn call(method: &str, url: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("authorization", b));
    }
    http_request(method, url, &headers, body).expect("the hub answers")
}

#[test]
fn each_role_reaches_what_it_may_and_changes_are_attributed_to_the_token() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    let (viewer, v_entry) = token("vera", "viewer");
    let (operator, o_entry) = token("olga", "operator");
    let (admin, a_entry) = token("ada", "admin");
    let extra = format!("[api]\nrequire_token = true\n{v_entry}{o_entry}{a_entry}");
    let (_hub, _uplink, api) = mesh.start_hub("hub-1", &extra);

    // No token, or an unknown one: 401, saying what to do.
    let (status, body) = call("GET", &format!("{api}/api/v1/fleet"), None, "");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("needs a token"), "{body}");
    let (status, _) = call(
        "GET",
        &format!("{api}/api/v1/fleet"),
        Some("trellis_nope"),
        "",
    );
    assert_eq!(status, 401);
    let (status, _) = call("GET", &format!("{api}/metrics"), None, "");
    assert_eq!(status, 401, "/metrics is behind the same rule");

    // A viewer reads, and may not write.
    for path in [
        "/api/v1/fleet",
        "/api/v1/desired",
        "/api/v1/log",
        "/metrics",
    ] {
        let (status, body) = call("GET", &format!("{api}{path}"), Some(&viewer), "");
        assert_eq!(status, 200, "{path}: {body}");
    }
    let put = r#"{"value": "3", "author": "mallory"}"#;
    let url = format!("{api}/api/v1/desired/web.replicas");
    let (status, body) = call("PUT", &url, Some(&viewer), put);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("vera holds the viewer role"), "{body}");
    assert!(body.contains("needs operator"), "{body}");

    // An operator writes; the log says olga, not the author claimed.
    let (status, body) = call("PUT", &url, Some(&operator), put);
    assert_eq!(status, 200, "{body}");
    let (_, log) = call("GET", &format!("{api}/api/v1/log"), Some(&viewer), "");
    let log: Value = serde_json::from_str(&log).unwrap();
    let entries = log["entries"].as_array().expect("entries");
    let put_entry = entries
        .iter()
        .find(|e| e.to_string().contains("web.replicas"))
        .unwrap_or_else(|| panic!("no entry for the write: {log}"));
    assert_eq!(put_entry["entry"]["author"], "olga", "{put_entry}");

    // Revoking needs an admin: the operator is refused before the body is
    // looked at; the admin gets as far as the body (not a revocation).
    let rev = format!("{api}/api/v1/revocations");
    let (status, body) = call("POST", &rev, Some(&operator), "x");
    assert_eq!(status, 403, "{body}");
    let (status, body) = call("POST", &rev, Some(&admin), "x");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not a signed revocation"), "{body}");

    // Every route of the documented table, with a token of each role:
    // allowed cells get past the check (whatever the handler then makes of
    // a garbage body), the others are refused for their role.
    let roles = [
        ("viewer", &viewer),
        ("operator", &operator),
        ("admin", &admin),
    ];
    let mut checked = 0;
    for &(method, path) in ROUTES {
        let concrete = path
            .replace("{site}", "par")
            .replace("{version}", "1")
            .replace("{hash}", &"00".repeat(32))
            .replace("{name}", "p")
            .replace("{run}", "1")
            .replace("{key}", "k");
        let needed = required_role(&method.parse().unwrap(), path);
        for (role_name, token) in roles {
            let role: ApiRole = role_name.parse().unwrap();
            let (status, body) = call(method, &format!("{api}{concrete}"), Some(token), "x");
            let refused = status == 403 && body.contains("holds the");
            if role >= needed {
                assert!(
                    status != 401 && !refused,
                    "{role_name} {method} {path}: {status} {body}"
                );
            } else {
                assert!(refused, "{role_name} {method} {path}: {status} {body}");
            }
            checked += 1;
        }
        let (status, _) = call(method, &format!("{api}{concrete}"), None, "x");
        assert_eq!(status, 401, "{method} {path} without a token");
    }
    assert_eq!(checked, ROUTES.len() * 3);

    // The CLI sends its token; without one it says why it was refused.
    let out = run(
        "trellis",
        &[
            "desired",
            "set",
            "web.replicas",
            "4",
            "--hub",
            &api,
            "--token",
            &operator,
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let out = run("trellis", &["desired", "get", "--hub", &api]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a token"),
        "{out:?}"
    );
}

#[test]
fn a_caller_over_its_request_rate_is_told_to_wait_and_others_are_not() {
    let _serial = serial();
    let mesh = Mesh::new();
    mesh.issue("hub", "eu", "", "hub-1");
    let (greedy, g_entry) = token("greedy", "viewer");
    let (calm, c_entry) = token("calm", "viewer");
    let extra = format!("[api]\nrequire_token = true\nrequests_per_s = 5\n{g_entry}{c_entry}");
    let (_hub, _uplink, api) = mesh.start_hub("hub-1", &extra);
    let url = format!("{api}/api/v1/fleet");
    // A burst of twice the rate passes; the next requests, sent at once,
    // are refused with a Retry-After.
    let statuses: Vec<u16> = (0..30)
        .map(|_| call("GET", &url, Some(&greedy), "").0)
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let busy = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + busy, 30, "{statuses:?}");
    assert!(
        (10..=15).contains(&ok),
        "burst of 10 (and what refilled): {statuses:?}"
    );
    let (status, body) = call("GET", &url, Some(&greedy), "");
    assert_eq!(status, 429);
    assert!(
        body.contains("too many requests from token greedy"),
        "{body}"
    );
    assert!(body.contains("retry in"), "{body}");
    // Another caller has its own budget.
    assert_eq!(call("GET", &url, Some(&calm), "").0, 200);
    // The CLI waits as told and gets its answer.
    let out = run("trellis", &["status", "--hub", &api, "--token", &greedy]);
    assert!(out.status.success(), "{out:?}");
}
