//! Configuration files of `pixflow serve`: precedence (flags > environment > file > defaults),
//! every problem reported by field and position, secrets never echoed, and a node started from
//! a file.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use super::{pixflow, spawn_serve, temp_dir};

/// `pixflow ARGS` in `dir` with these environment variables and this standard input.
fn pixflow_with(dir: &Path, args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pixflow"))
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pixflow");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `config check` of `body` written as `name` in `dir`: exit code, stdout, stderr.
fn check(dir: &Path, name: &str, body: &str, extra: &[&str]) -> (i32, String, String) {
    std::fs::write(dir.join(name), body).unwrap();
    let out = pixflow(&[&["config", "check", name][..], extra].concat(), dir);
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn a_good_file_checks_ok_from_a_path_or_standard_input() {
    let dir = temp_dir("config-ok");
    let body = "# the node\nlisten: 127.0.0.1:9000\ndata_dir: node-data\nurl-allow: [a.example, b.example]\n\
                cdn-allow-unsigned: true\nmax-held-bytes: 2Gi\nmax-requests: 64\nfunctions: ~\n";
    let (code, out, err) = check(&dir, "pixflow.yaml", body, &[]);
    assert_eq!((code, out.as_str()), (0, "pixflow.yaml: ok\n"), "{err}");
    // JSON is YAML; `-` reads standard input.
    let out = pixflow_with(&dir, &["config", "check", "-"], &[], r#"{"listen": "127.0.0.1:9001", "cpus": 2}"#);
    assert_eq!((out.status.code(), text(&out.stdout).as_str()), (Some(0), "-: ok\n"), "{}", text(&out.stderr));
    let out = pixflow_with(&dir, &["config", "check", "-"], &[], "cpus: 2\nlisten: nowhere\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with("-:2:9: field `listen`: "), "{}", text(&out.stderr));
    // An empty file sets nothing.
    assert_eq!(check(&dir, "empty.yaml", "", &[]).0, 0);
}

#[test]
fn flags_override_the_environment_which_overrides_the_file() {
    let dir = temp_dir("config-precedence");
    let body = "listen: 127.0.0.1:9000\nmax-requests: 10\nurl_allow: [a.example, b.example]\n\
                admin-token: pfx_file-sekrit\nshutdown-grace: 5s\n";
    std::fs::write(dir.join("pixflow.yaml"), body).unwrap();
    let print = ["config", "check", "pixflow.yaml", "--print"];
    let out = pixflow_with(&dir, &print, &[], "");
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "pixflow.yaml: ok\n");
    for line in [
        "listen: 127.0.0.1:9000\n",
        "max-requests: 10\n",
        "url-allow:\n- a.example\n- b.example\n",
        "admin-token: <redacted>\n",
        "shutdown-grace: 5s\n",
        // Not in the file: the built-in default.
        "max-held-bytes: 1Gi\n",
        "functions: null\n",
        "cdn-allow-unsigned: false\n",
    ] {
        assert!(shown.contains(line), "{line:?} missing from\n{shown}");
    }
    assert!(!shown.contains("sekrit"), "{shown}");
    // The printed settings are a configuration file themselves.
    assert_eq!(check(&dir, "printed.yaml", &shown, &[]).0, 0);

    // The environment wins over the file (a list as a whole, not merged).
    let env = [("PIXFLOW_LISTEN", "127.0.0.1:9999"), ("PIXFLOW_URL_ALLOW", "c.example")];
    let shown = text(&pixflow_with(&dir, &print, &env, "").stdout);
    assert!(shown.contains("listen: 127.0.0.1:9999\n") && shown.contains("url-allow:\n- c.example\n"), "{shown}");
    assert!(shown.contains("max-requests: 10\n"), "{shown}");

    // A flag wins over both: the node keeps its state where the flag says.
    std::fs::write(dir.join("node.yaml"), "listen: 127.0.0.1:0\ndata-dir: from-file\n").unwrap();
    let (mut server, serving) = spawn_serve(
        &dir,
        &["--config", "node.yaml", "--data-dir", "from-flag"],
        &[("PIXFLOW_DATA_DIR", "from-environment")],
    );
    assert!(serving.ends_with("state in from-flag)"), "{serving}");
    stop(&mut server);
}

fn stop(server: &mut std::process::Child) {
    let killed = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(killed.success());
    assert!(server.wait().unwrap().success());
}

#[test]
fn every_problem_is_reported_with_its_field_and_position() {
    let dir = temp_dir("config-problems");
    let body = "listen: nope\nmax-held-bytes: 12X\ndata-dir: {a: 1}\n";
    let (code, out, err) = check(&dir, "bad.yaml", body, &[]);
    assert_eq!((code, out.as_str()), (2, ""));
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].starts_with("bad.yaml:1:9: field `listen`: `nope`: "), "{err}");
    assert_eq!(lines[1], "bad.yaml:2:17: field `max-held-bytes`: `12X` is not a size like 512Mi or 1Gi");
    assert!(lines[2].starts_with("bad.yaml:3:11: field `data-dir`: expected a value, found a map"), "{err}");

    // Out of range, a bad duration, a value outside the choices, a list for one value, a
    // non-flag where true or false is expected.
    let body = "max-requests: -1\nshutdown-grace: soon\nobjects-backend: disk\nlisten: [a, b]\n\
                cdn-allow-unsigned: 'yes'\ncdn-auto-formats: [webp, png]\n";
    let (code, _, err) = check(&dir, "worse.yaml", body, &[]);
    assert_eq!(code, 2);
    let fields: Vec<&str> = err.lines().map(|l| l.split('`').nth(1).unwrap_or(l)).collect();
    assert_eq!(
        fields,
        ["max-requests", "shutdown-grace", "objects-backend", "listen", "cdn-allow-unsigned", "cdn-auto-formats"],
        "{err}"
    );
    assert!(err.contains("worse.yaml:3:18: field `objects-backend`: `disk`: expected one of embedded, s3"), "{err}");
    assert!(err.contains("worse.yaml:6:19: field `cdn-auto-formats`: `png`: auto may pick avif or webp"), "{err}");

    // Settings that contradict each other, once every value is valid; flags other settings
    // need.
    let (code, _, err) = check(&dir, "clash.yaml", "cdn-inline-active: [site]\nobjects-s3-region: eu\n", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("clash.yaml: field `objects-backend`: --objects-s3-* options need"), "{err}");
    assert!(err.contains("clash.yaml:1:1: field `cdn-inline-active`: --cdn-inline-active needs --cdn-listen"), "{err}");
    let (code, _, err) = check(&dir, "needs.yaml", "s3-listen: 127.0.0.1:0\n", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("field `s3-access-key`: not set, but another setting needs it"), "{err}");
}

#[test]
fn unknown_keys_are_named_with_the_closest_flag() {
    let dir = temp_dir("config-keys");
    let body = "lisen: 127.0.0.1:1\nmax_request: 5\nserver: http://x\nconfig: other.yaml\nlisten: 127.0.0.1:2\n\
                listen_x_y_z: 1\n";
    let (code, _, err) = check(&dir, "keys.yaml", body, &[]);
    assert_eq!(code, 2);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [
            "keys.yaml:1:1: field `lisen`: unknown key: not a flag of `pixflow serve`; did you mean `listen`?",
            "keys.yaml:2:1: field `max_request`: unknown key: not a flag of `pixflow serve`; did you mean `max-requests`?",
            "keys.yaml:3:1: field `server`: is an option of `pixflow deploy`, not of `pixflow serve`",
            "keys.yaml:4:1: field `config`: `config` names the file itself and cannot be set in one",
            "keys.yaml:6:1: field `listen_x_y_z`: unknown key: not a flag of `pixflow serve`",
        ],
        "{err}"
    );
    let (code, _, err) = check(&dir, "twice.yaml", "data-dir: a\ndata_dir: b\n", &[]);
    assert_eq!((code, err.as_str()), (2, "twice.yaml:2:1: field `data-dir`: set twice (also as `data-dir`)\n"));
}

#[test]
fn syntax_errors_have_a_line_and_column() {
    let dir = temp_dir("config-syntax");
    let (code, _, err) = check(&dir, "broken.yaml", "listen: 127.0.0.1:8080\ndata-dir: [unclosed\ncpus: 2\n", &[]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("broken.yaml:3:5: not valid YAML: "), "{err}");
    let (code, _, err) = check(&dir, "list.yaml", "- listen\n- cpus\n", &[]);
    assert_eq!(code, 2);
    assert!(err.starts_with("list.yaml: expected a mapping of `pixflow serve` flag names"), "{err}");
    let out = pixflow(&["config", "check", "missing.yaml"], &dir);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).starts_with("missing.yaml: cannot be read: "), "{}", text(&out.stderr));
}

#[test]
fn secrets_are_never_echoed() {
    let dir = temp_dir("config-secrets");
    let body = "admin-token: {value: sekrit-admin}\ncdn-signing-key: [sekrit-cdn]\nobjects-s3-secret-key: 7\n\
                s3-secret-key: [sekrit-s3]\n";
    let (code, out, err) = check(&dir, "secrets.yaml", body, &[]);
    assert_eq!(code, 2);
    assert_eq!(err.lines().count(), 3, "{err}");
    assert!(err.contains("field `admin-token`") && err.contains("field `cdn-signing-key`"), "{err}");
    assert!(!err.contains("sekrit") && !out.contains("sekrit"), "{err}");
    let (code, _, err) = check(&dir, "short.yaml", "s3-secret-key: hunter2\n", &[]);
    assert_eq!(code, 2);
    assert_eq!(err, "short.yaml:1:1: field `s3-secret-key`: use at least 16 characters\n");
    // The same file refuses to start a node, with the same words, before any state exists.
    let out = pixflow(&["serve", "--config", "short.yaml", "--data-dir", "data"], &dir);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stderr), err);
    assert!(!dir.join("data").exists());
}

#[test]
fn serve_starts_from_a_config_file() {
    let dir = temp_dir("config-serve");
    let data = dir.join("node-data");
    let body = format!("listen: 127.0.0.1:0\ndata-dir: {}\n", data.display());
    std::fs::write(dir.join("pixflow.yaml"), body).unwrap();
    let (mut server, serving) = spawn_serve(&dir, &[], &[("PIXFLOW_CONFIG", "pixflow.yaml")]);
    let addr = serving.split_whitespace().next().unwrap();
    assert!(addr.starts_with("127.0.0.1:") && !addr.ends_with(":8080"), "{serving}");
    assert!(serving.ends_with(&format!("state in {})", data.display())), "{serving}");
    assert!(data.join("admin-token").exists());
    stop(&mut server);
}

#[test]
fn a_postgres_state_needs_its_url_and_never_shows_it() {
    let dir = temp_dir("config-state");
    let (code, _, err) = check(&dir, "no-url.yaml", "listen: 127.0.0.1:0\nstate: postgres\n", &[]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "no-url.yaml:2:1: field `state`: --state postgres needs --state-url (postgres://user:password@host:5432/database)\n"
    );
    let url = "postgres://pixflow:hunter2-sekrit@db.internal:5432/pixflow";
    let (code, _, err) = check(&dir, "stray.yaml", &format!("state-url: {url}\n"), &[]);
    assert_eq!(code, 2);
    assert!(
        err.starts_with(
            "stray.yaml:1:1: field `state-url`: --state-url names a PostgreSQL database: it needs --state postgres"
        ),
        "{err}"
    );
    assert!(!err.contains("sekrit"), "{err}");
    let (code, _, err) = check(&dir, "node.yaml", "node-name: two words\n", &[]);
    assert_eq!(code, 2);
    assert!(err.starts_with("node.yaml:1:1: field `node-name`: use 1 to 200 visible ASCII characters"), "{err}");
    // Complete: checked without connecting; the URL is a secret in the printed settings.
    let body = format!("state: postgres\nstate-url: {url}\nnode-name: node-1\n");
    let (code, out, err) = check(&dir, "shared.yaml", &body, &["--print"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("state: postgres\n") && out.contains("state-url: <redacted>\n"), "{out}");
    assert!(out.contains("node-name: node-1\n") && !out.contains("sekrit"), "{out}");
    // An environment variable chooses the backend too.
    let out = pixflow_with(&dir, &["config", "check", "-"], &[("PIXFLOW_STATE", "postgres")], "cpus: 2\n");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("field `state`: --state postgres needs --state-url"), "{}", text(&out.stderr));
}
