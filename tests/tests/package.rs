//! The Debian packages as an administrator meets them: `packaging/build-debs`
//! packages the binaries this test run uses, each package holds what
//! docs/PACKAGING.md says, and the node, relay and hub packages install into
//! a throwaway root (`dpkg --root`, maintainer scripts run against it), with
//! their units, configurations and state directories in place; removing keeps
//! the configuration and purging deletes it. Needs dpkg (Debian or a
//! derivative); without it the tests say so and pass without running.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use trellis_tests::bin;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_owned()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The tools the packaging needs, or why the test cannot run.
fn dpkg_available() -> bool {
    let missing: Vec<&str> = ["dpkg", "dpkg-deb", "dpkg-query", "bash"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    if !missing.is_empty() {
        // CI runs on Debian: there, a missing dpkg is a broken machine, not
        // a reason to check nothing.
        assert!(
            std::env::var_os("CI").is_none(),
            "{} not found on a CI machine",
            missing.join(", ")
        );
        eprintln!(
            "skipped: {} not found; the packages are built and installed with Debian's dpkg",
            missing.join(", ")
        );
    }
    missing.is_empty()
}

/// dpkg wants ldconfig and start-stop-daemon on PATH, which an ordinary
/// user's PATH may lack.
fn path_with_sbin() -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{path}:/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin")
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .env("PATH", path_with_sbin())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `[workspace.package] version` of the workspace Cargo.toml.
fn workspace_version() -> String {
    let manifest: toml::Table = read(&workspace().join("Cargo.toml"))
        .parse()
        .expect("Cargo.toml");
    manifest["workspace"]["package"]["version"]
        .as_str()
        .expect("[workspace.package] version")
        .to_owned()
}

/// The packages, built from the binaries this test run uses.
struct Debs {
    node: PathBuf,
    relay: PathBuf,
    hub: PathBuf,
}

fn build_debs(out: &Path) -> Debs {
    // The harness finds the binaries in target/<profile>/; so does the script.
    let profile_dir = bin("trellis-node")
        .parent()
        .expect("target/<profile>")
        .to_owned();
    for b in ["trellis-relay", "trellis-hub", "trellis"] {
        bin(b);
    }
    let target_dir = profile_dir.parent().expect("target/");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("no profile directory in {}", profile_dir.display()),
    };
    let mut cmd = Command::new(workspace().join("packaging/build-debs"));
    cmd.args(["--profile", profile, "--no-build", "--target-dir"])
        .arg(target_dir)
        .arg("--out")
        .arg(out);
    if !have("strip") {
        cmd.arg("--no-strip");
    }
    let listed = stdout(&run_ok(&mut cmd));

    let version = workspace_version().replacen('-', "~", 1);
    let arch = stdout(&run_ok(Command::new("dpkg").arg("--print-architecture")))
        .trim()
        .to_owned();
    let deb = |pkg: &str| {
        let path = out.join(format!("{pkg}_{version}_{arch}.deb"));
        assert!(path.is_file(), "no {} in {listed}", path.display());
        assert!(
            listed.lines().any(|l| Path::new(l) == path),
            "build-debs did not print {}: {listed}",
            path.display()
        );
        path
    };
    Debs {
        node: deb("trellis-node"),
        relay: deb("trellis-relay"),
        hub: deb("trellis-hub"),
    }
}

/// `dpkg-deb --field` of one control field.
fn field(deb: &Path, name: &str) -> String {
    stdout(&run_ok(
        Command::new("dpkg-deb").arg("--field").arg(deb).arg(name),
    ))
    .trim()
    .to_owned()
}

/// The paths a package installs (`./usr/bin/x` → `/usr/bin/x`), checking
/// that every one belongs to root.
fn contents(deb: &Path) -> Vec<String> {
    let listing = stdout(&run_ok(Command::new("dpkg-deb").arg("--contents").arg(deb)));
    listing
        .lines()
        .map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(cols[1], "root/root", "{}: {line}", deb.display());
            let path = cols[5].trim_start_matches('.').trim_end_matches('/');
            if path.is_empty() { "/" } else { path }.to_owned()
        })
        .collect()
}

#[test]
fn each_package_holds_its_binaries_unit_default_config_and_control_fields() {
    if !dpkg_available() {
        return;
    }
    let out = tempfile::tempdir().expect("temp dir");
    let debs = build_debs(out.path());
    let version = workspace_version().replacen('-', "~", 1);

    for (deb, pkg, role, binaries, runs_as_trellis) in [
        (
            &debs.node,
            "trellis-node",
            "node",
            &["trellis-node"][..],
            false,
        ),
        (
            &debs.relay,
            "trellis-relay",
            "relay",
            &["trellis-relay"],
            true,
        ),
        (
            &debs.hub,
            "trellis-hub",
            "hub",
            &["trellis-hub", "trellis"],
            true,
        ),
    ] {
        assert_eq!(field(deb, "Package"), pkg);
        assert_eq!(field(deb, "Version"), version);
        assert_eq!(field(deb, "Section"), "admin");
        assert_eq!(field(deb, "Priority"), "optional");
        assert!(!field(deb, "Maintainer").is_empty(), "{pkg}: no Maintainer");
        assert!(
            !field(deb, "Description").is_empty(),
            "{pkg}: no Description"
        );
        let depends = field(deb, "Depends");
        assert!(depends.contains("libc6"), "{pkg} Depends: {depends}");
        assert_eq!(
            depends.contains("adduser"),
            runs_as_trellis,
            "{pkg} Depends: {depends} (a tool to create the user trellis when, and only when, the service runs as it)"
        );

        let conffiles = stdout(&run_ok(
            Command::new("dpkg-deb")
                .arg("--info")
                .arg(deb)
                .arg("conffiles"),
        ));
        assert_eq!(
            conffiles.trim(),
            format!("/etc/trellis/{role}.toml"),
            "{pkg}"
        );

        let files = contents(deb);
        let mut expected = vec![
            format!("/usr/lib/systemd/system/trellis-{role}.service"),
            format!("/etc/trellis/{role}.toml"),
            format!("/usr/share/doc/{pkg}/copyright"),
        ];
        expected.extend(binaries.iter().map(|b| format!("/usr/bin/{b}")));
        if runs_as_trellis {
            expected.push(format!("/usr/lib/sysusers.d/{pkg}.conf"));
        }
        for path in &expected {
            assert!(files.contains(path), "{pkg} lacks {path}: {files:?}");
        }
        let in_usr_bin: Vec<&String> = files
            .iter()
            .filter(|f| f.starts_with("/usr/bin/"))
            .collect();
        assert_eq!(in_usr_bin.len(), binaries.len(), "{pkg}: {in_usr_bin:?}");
        // State is made by postinst and the unit, not shipped: dpkg would
        // otherwise warn about it on every removal.
        assert!(
            !files.iter().any(|f| f.starts_with("/var/")),
            "{pkg}: {files:?}"
        );
    }
}

/// A throwaway root with an empty dpkg database.
struct Root {
    dir: PathBuf,
}

impl Root {
    fn new(dir: PathBuf) -> Root {
        for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
            fs::create_dir_all(dir.join(d)).expect("dpkg database");
        }
        fs::write(dir.join("var/lib/dpkg/status"), "").expect("status");
        Root { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p.trim_start_matches('/'))
    }

    /// dpkg on this root: maintainer scripts run here with DPKG_ROOT set
    /// (`--force-script-chrootless`), the root holds no libc6 to depend on
    /// (`--force-depends`), and an ordinary user may run it
    /// (`--force-not-root`).
    fn dpkg(&self, args: &[&str]) -> Output {
        run_ok(
            Command::new("dpkg")
                .arg(format!("--root={}", self.dir.display()))
                .args([
                    "--force-script-chrootless",
                    "--force-not-root",
                    "--force-depends",
                    "--force-confdef",
                    "--force-confold",
                    "--log=/dev/null",
                ])
                .args(args),
        )
    }

    fn install(&self, deb: &Path) -> Output {
        self.dpkg(&["-i", deb.to_str().expect("utf-8 path")])
    }

    /// `${Status}` of a package in this root's database ("not-installed"
    /// when dpkg does not know it).
    fn status(&self, pkg: &str) -> String {
        let out = Command::new("dpkg-query")
            .arg(format!(
                "--admindir={}",
                self.path("/var/lib/dpkg").display()
            ))
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .expect("dpkg-query");
        if out.status.success() {
            stdout(&out).trim().to_owned()
        } else {
            "not-installed".to_owned()
        }
    }

    fn conffiles(&self, pkg: &str) -> String {
        stdout(&run_ok(
            Command::new("dpkg-query")
                .arg(format!(
                    "--admindir={}",
                    self.path("/var/lib/dpkg").display()
                ))
                .args(["-W", "-f=${Conffiles}", pkg]),
        ))
    }

    /// The effective configuration of an installed role's default config,
    /// printed by its installed binary.
    fn print_config(&self, role: &str) -> toml::Table {
        let out = run_ok(
            Command::new(self.path(&format!("/usr/bin/trellis-{role}")))
                .arg("--print-config")
                .arg("--config")
                .arg(self.path(&format!("/etc/trellis/{role}.toml"))),
        );
        stdout(&out)
            .parse()
            .unwrap_or_else(|e| panic!("--print-config of {role}.toml is not TOML: {e}"))
    }
}

/// `Key=Value` settings of a unit file, in order (comments and sections
/// left out).
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn setting<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn str_at<'a>(t: &'a toml::Table, section: &str, key: &str) -> &'a str {
    t[section][key]
        .as_str()
        .unwrap_or_else(|| panic!("no {section}.{key} in {t}"))
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Checks each unit with `systemd-analyze verify`, when it is installed: it
/// prints nothing for a unit it fully understands. ExecStart= is pointed at
/// the throwaway root's binary, which verify wants to exist.
fn verify_units(root: &Root, roles: &[&str], scratch: &Path) {
    if !have("systemd-analyze") {
        eprintln!("systemd-analyze not found: the unit files are not verified by systemd");
        return;
    }
    let dir = scratch.join("units");
    fs::create_dir_all(&dir).expect("units dir");
    let mut units = Vec::new();
    for role in roles {
        let name = format!("trellis-{role}.service");
        let text = read(&root.path(&format!("/usr/lib/systemd/system/{name}")));
        let bin = format!("/usr/bin/trellis-{role}");
        let text = text.replace(
            &format!("ExecStart={bin}"),
            &format!("ExecStart={}", root.path(&bin).display()),
        );
        fs::write(dir.join(&name), text).expect("unit copy");
        units.push(dir.join(&name));
    }
    let out = run_ok(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .args(&units),
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.trim().is_empty(), "systemd-analyze verify: {said}");
}

#[test]
fn the_packages_install_into_a_throwaway_root_and_remove_and_purge_as_debian_does() {
    if !dpkg_available() {
        return;
    }
    let scratch = tempfile::tempdir().expect("temp dir");
    let debs = build_debs(&scratch.path().join("debs"));
    let root = Root::new(scratch.path().join("root"));
    let me = fs::metadata(scratch.path()).expect("temp dir").uid();
    let host_state_before = Path::new("/var/lib/trellis/node").exists();

    // The node.
    root.install(&debs.node);
    assert_eq!(root.status("trellis-node"), "install ok installed");
    let unit_path = root.path("/usr/lib/systemd/system/trellis-node.service");
    let unit = unit_settings(&read(&unit_path));
    assert_eq!(
        setting(&unit, "ExecStart"),
        Some("/usr/bin/trellis-node --config /etc/trellis/node.toml"),
        "{}",
        unit_path.display()
    );
    assert_eq!(setting(&unit, "User"), None, "the node agent runs as root");
    assert_eq!(setting(&unit, "Restart"), Some("on-failure"));
    assert_eq!(setting(&unit, "StateDirectory"), Some("trellis/node"));
    assert_eq!(setting(&unit, "WantedBy"), Some("multi-user.target"));

    let node = root.print_config("node");
    assert_eq!(
        str_at(&node, "config", "state_dir"),
        "/var/lib/trellis/node/config"
    );
    assert_eq!(
        str_at(&node, "patch", "dir"),
        "/var/lib/trellis/node/patches"
    );
    for key in ["ca", "cert", "key"] {
        let p = str_at(&node, "identity", key);
        assert!(p.starts_with("/etc/trellis/node/"), "identity.{key} = {p}");
    }
    assert!(root.path("/etc/trellis/node").is_dir());
    assert_eq!(mode(&root.path("/var/lib/trellis/node")), 0o700);
    let conffiles = root.conffiles("trellis-node");
    assert!(
        conffiles.contains("/etc/trellis/node.toml "),
        "conffiles: {conffiles:?}"
    );
    // Every shipped file is as its md5sums say.
    let verify = stdout(&root.dpkg(&["--verify", "trellis-node"]));
    assert!(verify.trim().is_empty(), "dpkg --verify: {verify}");

    // The relay and the hub, side by side: both create the user trellis.
    root.install(&debs.relay);
    root.install(&debs.hub);
    for (role, state_key, state_path) in [
        (
            "relay",
            ("buffer", "path"),
            "/var/lib/trellis/relay/outage.db",
        ),
        ("hub", ("store", "path"), "/var/lib/trellis/hub/hub.db"),
    ] {
        let pkg = format!("trellis-{role}");
        assert_eq!(root.status(&pkg), "install ok installed");
        let unit_path = root.path(&format!("/usr/lib/systemd/system/{pkg}.service"));
        let unit = unit_settings(&read(&unit_path));
        let expect = [
            (
                "ExecStart",
                format!("/usr/bin/{pkg} --config /etc/trellis/{role}.toml"),
            ),
            ("User", "trellis".into()),
            ("Group", "trellis".into()),
            ("NoNewPrivileges", "yes".into()),
            ("ProtectSystem", "strict".into()),
            ("ProtectHome", "yes".into()),
            ("PrivateTmp", "yes".into()),
            ("PrivateDevices", "yes".into()),
            ("CapabilityBoundingSet", String::new()),
            ("StateDirectory", format!("trellis/{role}")),
            ("ReadWritePaths", format!("/var/lib/trellis/{role}")),
        ];
        for (key, value) in expect {
            assert_eq!(
                setting(&unit, key),
                Some(value.as_str()),
                "{key}= in {}",
                unit_path.display()
            );
        }
        let config = root.print_config(role);
        assert_eq!(str_at(&config, state_key.0, state_key.1), state_path);
        for key in ["ca", "cert", "key"] {
            let p = str_at(&config, "identity", key);
            assert!(p.starts_with(&format!("/etc/trellis/{role}/")), "{p}");
        }
        let sysusers = read(&root.path(&format!("/usr/lib/sysusers.d/{pkg}.conf")));
        assert!(
            sysusers.lines().any(|l| l.starts_with("u trellis ")),
            "{sysusers}"
        );
        assert_eq!(mode(&root.path(&format!("/var/lib/trellis/{role}"))), 0o750);
    }
    assert!(root.path("/usr/bin/trellis").is_file());
    if have("systemd-sysusers") {
        // postinst made the user in the root's own database, not this one's.
        let passwd = read(&root.path("/etc/passwd"));
        let line = passwd
            .lines()
            .find(|l| l.starts_with("trellis:"))
            .unwrap_or_else(|| panic!("no user trellis in the root's /etc/passwd:\n{passwd}"));
        let uid: u32 = line.split(':').nth(2).unwrap().parse().unwrap();
        let state = fs::metadata(root.path("/var/lib/trellis/relay")).unwrap();
        if me == 0 {
            assert_eq!(state.uid(), uid, "the relay's state belongs to trellis");
        }
    } else {
        eprintln!("systemd-sysusers not found: the user trellis is not checked");
    }
    verify_units(&root, &["node", "relay", "hub"], scratch.path());

    // An edited configuration survives a reinstall (an upgrade to the same
    // version): it is a conffile.
    let config = root.path("/etc/trellis/node.toml");
    let edited = format!("{}\n# edited by the administrator\n", read(&config));
    fs::write(&config, &edited).unwrap();
    root.install(&debs.node);
    assert_eq!(read(&config), edited, "the edit was overwritten");

    // Remove: the program and unit go, the configuration and state stay.
    root.dpkg(&["-r", "trellis-node"]);
    assert_eq!(root.status("trellis-node"), "deinstall ok config-files");
    assert!(!root.path("/usr/bin/trellis-node").exists());
    assert!(!unit_path.exists());
    assert_eq!(read(&config), edited);
    assert!(root.path("/var/lib/trellis/node").is_dir());

    // Purge: the configuration, the identity directory and the state go
    // too; the other packages' stay.
    root.dpkg(&["-P", "trellis-node"]);
    assert_eq!(root.status("trellis-node"), "not-installed");
    for gone in [
        "/etc/trellis/node.toml",
        "/etc/trellis/node",
        "/var/lib/trellis/node",
    ] {
        assert!(!root.path(gone).exists(), "{gone} survived the purge");
    }
    assert!(root.path("/etc/trellis/relay.toml").is_file());
    assert!(root.path("/var/lib/trellis/hub").is_dir());

    root.dpkg(&["-P", "trellis-relay", "trellis-hub"]);
    for gone in ["/etc/trellis", "/var/lib/trellis", "/usr/bin/trellis"] {
        assert!(!root.path(gone).exists(), "{gone} survived the purge");
    }

    // Nothing was done to this machine itself.
    assert_eq!(
        Path::new("/var/lib/trellis/node").exists(),
        host_state_before,
        "the install touched this machine's /var/lib/trellis"
    );
}

#[test]
fn build_debs_names_a_missing_binary_and_the_command_that_builds_it() {
    if !dpkg_available() {
        return;
    }
    let empty = tempfile::tempdir().expect("temp dir");
    let out = Command::new(workspace().join("packaging/build-debs"))
        .args(["--profile", "dev", "--no-build", "--target-dir"])
        .arg(empty.path())
        .arg("--out")
        .arg(empty.path().join("debs"))
        .output()
        .expect("build-debs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}/debug/trellis-node is missing",
            empty.path().display()
        )),
        "{err}"
    );
    assert!(
        err.contains("cargo build --bins -p trellis-node -p trellis-relay -p trellis-hub"),
        "{err}"
    );
    assert!(
        !empty.path().join("debs").exists(),
        "a failed build-debs made its output directory"
    );

    let help = Command::new(workspace().join("packaging/build-debs"))
        .arg("--help")
        .output()
        .expect("build-debs --help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    for needle in [
        "--profile",
        "--no-build",
        "--out",
        "target/debian",
        "cargo build --release",
    ] {
        assert!(
            help.contains(needle),
            "--help does not mention {needle}:\n{help}"
        );
    }
}
