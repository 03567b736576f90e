//! Static checks of the deployment files (Dockerfile, compose/, systemd/, k8s/,
//! docs/deploy.md) against the contract in SPEC.md ("Deployment" and the
//! configuration table). Nothing is built or started: the files are parsed
//! and cross-checked. When `systemd-analyze` is installed the unit is also
//! verified and its sandbox scored; otherwise those checks print a note and pass.

use serde_yaml_ng::Value;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every environment variable the daemon reads: the one list, kept where the configuration is
/// parsed. Deployment files may set only these, so a typo cannot silently fall back to a default.
use message_dispatcher::config::VARIABLES as ENV_VARS;

const BINARIES: &[&str] = &["message-dispatcher", "add-test-messages", "webhook-sink"];

/// SPEC defaults that the timing checks fall back to.
const DEFAULT_MAX_PROCESSING_TIME: &str = "30s";
const DEFAULT_WEBHOOK_TIMEOUT: &str = "10s";
const DEFAULT_LOCK_TTL: &str = "3m";
const DEFAULT_SERVER_PORT: u64 = 8080;

// ---------------------------------------------------------------- helpers

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(rel: &str) -> Value {
    let mut v: Value = serde_yaml_ng::from_str(&read(rel))
        .unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"));
    v.apply_merge()
        .unwrap_or_else(|e| panic!("{rel}: bad merge key: {e}"));
    v
}

/// Parses the SPEC's duration syntax: `0`, `500ms`, `30s`, `2m`, `1h`.
fn duration(s: &str) -> Duration {
    let s = s.trim();
    if s == "0" {
        return Duration::ZERO;
    }
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or_else(|| panic!("duration {s:?} has no unit"));
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().unwrap_or_else(|_| panic!("bad duration {s:?}"));
    match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => panic!("bad duration unit in {s:?}"),
    }
}

#[test]
fn duration_helper_parses_the_spec_syntax() {
    assert_eq!(duration("500ms"), Duration::from_millis(500));
    assert_eq!(duration("15s"), Duration::from_secs(15));
    assert_eq!(duration("2m"), Duration::from_secs(120));
    assert_eq!(duration("1h"), Duration::from_secs(3600));
    assert_eq!(duration("0"), Duration::ZERO);
}

/// A YAML scalar as the string a container would see in its environment.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn str_at<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what} should be a string, got {v:?}"))
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what} should be a list, got {v:?}"))
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    seq(v, what)
        .iter()
        .map(|x| str_at(x, what).to_string())
        .collect()
}

/// A compose `environment:` (map or list of KEY=VALUE) as pairs.
fn compose_env(service: &Value) -> Vec<(String, Option<String>)> {
    match &service["environment"] {
        Value::Null => Vec::new(),
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| (str_at(k, "environment key").to_string(), scalar(v)))
            .collect(),
        Value::Sequence(s) => s
            .iter()
            .map(|x| {
                let item = str_at(x, "environment item");
                match item.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (item.to_string(), None),
                }
            })
            .collect(),
        other => panic!("environment should be a map or a list, got {other:?}"),
    }
}

fn env_get(env: &[(String, Option<String>)], key: &str) -> Option<String> {
    env.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.clone())
}

fn assert_known_env(names: impl IntoIterator<Item = String>, origin: &str) {
    for name in names {
        assert!(
            ENV_VARS.contains(&name.as_str()),
            "{origin} sets {name}, which the daemon does not read"
        );
    }
}

/// The lease must outlive one cycle plus one webhook request (check-config
/// refuses anything else), so a deployment with a shorter TTL would not start.
fn assert_lease_timing(ttl: Option<String>, mpt: Option<String>, wt: Option<String>, origin: &str) {
    let ttl = duration(ttl.as_deref().unwrap_or(DEFAULT_LOCK_TTL));
    let mpt = duration(mpt.as_deref().unwrap_or(DEFAULT_MAX_PROCESSING_TIME));
    let wt = duration(wt.as_deref().unwrap_or(DEFAULT_WEBHOOK_TIMEOUT));
    assert!(
        ttl > mpt + wt,
        "{origin}: DISTRIBUTED_LOCK_TTL ({ttl:?}) must exceed MAX_PROCESSING_TIME + WEBHOOK_TIMEOUT ({:?})",
        mpt + wt
    );
}

// ---------------------------------------------------------------- SPEC list

#[test]
fn every_variable_is_documented_in_the_readme() {
    let readme = read("README.md");
    let table = readme
        .split("## Configuration")
        .nth(1)
        .expect("README.md has a Configuration section")
        .split("\n## ")
        .next()
        .unwrap();
    let words: BTreeSet<&str> = table
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    for name in ENV_VARS {
        assert!(
            words.contains(name),
            "README.md's configuration section does not mention {name}"
        );
    }
}

#[test]
fn the_daemon_reads_every_variable_of_the_spec_when_it_is_present() {
    // shared/ sits beside the checkout, locally and in CI; skip when absent.
    let spec_path = repo().join("../shared/SPEC.md");
    let Ok(spec) = fs::read_to_string(&spec_path) else {
        eprintln!(
            "note: {} not found; skipping the cross-check",
            spec_path.display()
        );
        return;
    };
    let section = spec
        .split("## Configuration")
        .nth(1)
        .expect("SPEC.md has a Configuration section")
        .split("\n## ")
        .next()
        .unwrap();
    let is_name = |w: &str| {
        w.len() > 2
            && w.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            && w.contains('_')
    };
    let mut rows = 0;
    for line in section.lines() {
        let Some(first) = line.strip_prefix('|').and_then(|l| l.split('|').next()) else {
            continue;
        };
        // A row names its variable, and sometimes the parts it is built from.
        let names: Vec<&str> = first
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .chain(line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
            .filter(|w| is_name(w))
            .collect();
        if names.is_empty() {
            continue;
        }
        rows += 1;
        for name in names {
            assert!(
                ENV_VARS.contains(&name),
                "SPEC.md names {name}; the daemon does not read it"
            );
        }
    }
    assert!(
        rows >= 15,
        "found only {rows} rows in SPEC.md's configuration table"
    );
}

// ---------------------------------------------------------------- Dockerfile

/// Dockerfile instructions with continuations joined and comments dropped.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let text = read("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let full = std::mem::take(&mut current);
        let (kw, rest) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        out.push((kw.to_ascii_uppercase(), rest.trim().to_string()));
    }
    assert!(
        current.trim().is_empty(),
        "Dockerfile ends inside a continued line"
    );
    out
}

/// The instructions of the final stage (after the last FROM).
fn final_stage() -> Vec<(String, String)> {
    let all = dockerfile_instructions();
    let last_from = all
        .iter()
        .rposition(|(k, _)| k == "FROM")
        .expect("Dockerfile has a FROM");
    all[last_from..].to_vec()
}

/// Parses an exec-form JSON array such as `["/app/x", "arg"]`.
fn exec_form(s: &str, what: &str) -> Vec<String> {
    let s = s.trim();
    assert!(
        s.starts_with('['),
        "{what} must use the exec form [\"…\"] (the image has no shell): {s}"
    );
    serde_yaml_ng::from_str(s).unwrap_or_else(|e| panic!("{what}: not a JSON array: {s}: {e}"))
}

#[test]
fn dockerfile_is_multi_stage_with_a_minimal_final_image() {
    let all = dockerfile_instructions();
    let froms: Vec<&String> = all
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, v)| v)
        .collect();
    assert!(
        froms.len() >= 2,
        "Dockerfile must be multi-stage, has {} FROM",
        froms.len()
    );
    let last = froms.last().unwrap().split_whitespace().next().unwrap();
    assert!(
        last == "scratch" || last.contains("distroless"),
        "final stage must be scratch or distroless, is {last}"
    );
    // The builder produces musl (static) binaries.
    let builder = froms[0].to_ascii_lowercase();
    let text = read("Dockerfile");
    assert!(
        builder.contains("alpine") || text.contains("musl"),
        "builder must build static musl binaries"
    );
}

#[test]
fn dockerfile_final_stage_runs_as_non_root() {
    let stage = final_stage();
    let user = stage
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, v)| v.clone())
        .expect("final stage must set USER");
    let name = user.split(':').next().unwrap().trim();
    assert!(
        !name.is_empty() && name != "root" && name != "0",
        "USER must not be root: {user}"
    );
    // scratch has no /etc/passwd: the user must be numeric there.
    assert!(
        name.chars().all(|c| c.is_ascii_digit()),
        "USER should be numeric on scratch: {user}"
    );
}

#[test]
fn dockerfile_copies_the_binaries_and_ca_certificates() {
    let stage = final_stage();
    let copies: Vec<Vec<String>> = stage
        .iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, v)| {
            v.split_whitespace()
                .filter(|t| !t.starts_with("--"))
                .map(String::from)
                .collect()
        })
        .collect();
    let copied_to = |target: &str| {
        copies.iter().any(|args| {
            let (dest, srcs) = args.split_last().unwrap();
            dest == target
                || (dest.ends_with('/')
                    && target.starts_with(dest.as_str())
                    && srcs.iter().any(|s| s.ends_with(&target[dest.len()..])))
        })
    };
    for bin in BINARIES {
        let target = format!("/app/{bin}");
        assert!(copied_to(&target), "final stage must COPY {target}");
    }
    assert!(
        copied_to("/etc/ssl/certs/ca-certificates.crt"),
        "final stage must carry CA certificates for https webhooks"
    );
}

#[test]
fn dockerfile_healthcheck_entrypoint_and_port() {
    let stage = final_stage();
    let get = |kw: &str| {
        stage
            .iter()
            .rev()
            .find(|(k, _)| k == kw)
            .map(|(_, v)| v.clone())
    };

    let hc = get("HEALTHCHECK").expect("final stage needs a HEALTHCHECK");
    let cmd = hc
        .split_once("CMD ")
        .map(|(_, c)| c)
        .unwrap_or_else(|| panic!("HEALTHCHECK needs CMD: {hc}"));
    let argv = exec_form(cmd, "HEALTHCHECK");
    assert!(
        !argv[0].ends_with("sh"),
        "HEALTHCHECK must not need a shell: {argv:?}"
    );
    assert_eq!(argv, ["/app/message-dispatcher", "healthcheck", "live"]);

    let ep = exec_form(&get("ENTRYPOINT").expect("ENTRYPOINT"), "ENTRYPOINT");
    assert_eq!(ep, ["/app/message-dispatcher"]);
    if let Some(cmd) = get("CMD") {
        assert_eq!(exec_form(&cmd, "CMD"), ["serve"]);
    }

    let exposed = get("EXPOSE").expect("EXPOSE");
    assert!(
        exposed
            .split_whitespace()
            .any(|p| p.trim_end_matches("/tcp") == "8080"),
        "EXPOSE 8080: {exposed}"
    );
}

#[test]
fn dockerignore_keeps_the_build_inputs() {
    let ignore = read(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(
        patterns.iter().any(|p| p.trim_matches('/') == "target"),
        "target/ must be ignored"
    );
    assert!(
        patterns.iter().any(|p| p.trim_matches('/') == ".git"),
        ".git must be ignored"
    );
    for needed in ["src", "sql", "Cargo.toml", "Cargo.lock"] {
        assert!(
            !patterns
                .iter()
                .any(|p| p.trim_matches('/') == needed || *p == "*" || *p == "**"),
            "{needed} is needed by the build and must not be ignored"
        );
    }
}

// ---------------------------------------------------------------- compose

/// Services that run one of our binaries (they build or use our image).
fn our_services(compose: &Value) -> Vec<(String, Value)> {
    compose["services"]
        .as_mapping()
        .expect("services")
        .iter()
        .filter(|(_, s)| {
            !s["build"].is_null()
                || s["image"]
                    .as_str()
                    .is_some_and(|i| i.starts_with("message-dispatcher"))
        })
        .map(|(k, s)| (str_at(k, "service name").to_string(), s.clone()))
        .collect()
}

/// (host port, container port) pairs of a service's `ports:`.
fn port_mappings(service: &Value) -> Vec<(Option<u64>, u64)> {
    let Some(ports) = service["ports"].as_sequence() else {
        return Vec::new();
    };
    ports
        .iter()
        .map(|p| {
            if let Some(m) = p.as_mapping() {
                let get = |k: &str| {
                    m.get(k)
                        .and_then(scalar)
                        .map(|s| s.parse::<u64>().expect("port number"))
                };
                return (get("published"), get("target").expect("ports: target"));
            }
            let s = scalar(p).expect("port mapping");
            let s = s.split('/').next().unwrap();
            let parts: Vec<&str> = s.split(':').collect();
            let container = parts.last().unwrap().parse().expect("container port");
            let host =
                (parts.len() >= 2).then(|| parts[parts.len() - 2].parse().expect("host port"));
            (host, container)
        })
        .collect()
}

fn healthcheck_test(service: &Value) -> Vec<String> {
    match &service["healthcheck"]["test"] {
        Value::Sequence(_) => strings(&service["healthcheck"]["test"], "healthcheck.test"),
        Value::String(s) => vec!["CMD-SHELL".into(), s.clone()],
        other => panic!("healthcheck.test missing or malformed: {other:?}"),
    }
}

fn assert_depends_on_healthy(service: &Value, name: &str, deps: &[&str]) {
    for dep in deps {
        assert_eq!(
            service["depends_on"][*dep]["condition"].as_str(),
            Some("service_healthy"),
            "{name} must wait for {dep} to be healthy"
        );
    }
}

/// Checks shared by both compose files.
fn check_compose_common(rel: &str, compose: &Value) {
    let services = &compose["services"];
    let pg = healthcheck_test(&services["postgres"]);
    assert!(
        pg.iter().any(|a| a.contains("pg_isready")),
        "{rel}: postgres healthcheck uses pg_isready: {pg:?}"
    );
    let redis = healthcheck_test(&services["redis"]);
    assert!(
        redis.iter().any(|a| a.contains("redis-cli")) && redis.iter().any(|a| a.contains("ping")),
        "{rel}: redis healthcheck uses redis-cli ping: {redis:?}"
    );

    // The sink runs from our image with its own entrypoint; the image's
    // HEALTHCHECK (the dispatcher's /health) must not apply to it.
    let sink = &services["webhook-sink"];
    assert_eq!(
        strings(&sink["entrypoint"], "webhook-sink entrypoint"),
        ["/app/webhook-sink"],
        "{rel}"
    );
    assert!(
        sink["healthcheck"]["disable"].as_bool() == Some(true)
            || !sink["healthcheck"]["test"].is_null(),
        "{rel}: webhook-sink would inherit the dispatcher's HEALTHCHECK; disable or replace it"
    );
    let sink_port = match &sink["command"] {
        Value::Null => 9090,
        cmd => {
            let args = strings(cmd, "webhook-sink command");
            let addr = args
                .iter()
                .skip_while(|a| *a != "--addr")
                .nth(1)
                .expect("--addr value");
            addr.rsplit(':').next().unwrap().parse().expect("sink port")
        }
    };

    let compose_dir = repo().join(rel).parent().unwrap().to_path_buf();
    for (name, service) in our_services(compose) {
        let env = compose_env(&service);
        assert_known_env(
            env.iter().map(|(k, _)| k.clone()),
            &format!("{rel} service {name}"),
        );

        let build = &service["build"];
        if !build.is_null() {
            let context = build["context"]
                .as_str()
                .or(build.as_str())
                .expect("build context");
            let dockerfile = build["dockerfile"].as_str().unwrap_or("Dockerfile");
            let path = compose_dir.join(context).join(dockerfile);
            assert!(
                path.is_file(),
                "{rel} service {name}: {} does not exist",
                path.display()
            );
            assert_eq!(
                fs::canonicalize(&path).unwrap(),
                fs::canonicalize(repo().join("Dockerfile")).unwrap(),
                "{rel} service {name} must build the top-level Dockerfile"
            );
        }
        if name == "webhook-sink" {
            continue;
        }
        // A dispatcher.
        assert_depends_on_healthy(&service, &name, &["postgres", "redis"]);
        assert_eq!(
            healthcheck_test(&service),
            ["CMD", "/app/message-dispatcher", "healthcheck", "live"],
            "{rel} service {name}: healthcheck via the healthcheck subcommand"
        );
        let webhook =
            env_get(&env, "WEBHOOK_URL").unwrap_or_else(|| panic!("{rel} {name}: WEBHOOK_URL"));
        assert_eq!(
            webhook
                .split_once("://")
                .map(|(_, rest)| rest.split('/').next().unwrap()),
            Some(format!("webhook-sink:{sink_port}").as_str()),
            "{rel} {name}: WEBHOOK_URL must point at the sink, is {webhook}"
        );
        let server_port =
            env_get(&env, "SERVER_PORT").map_or(DEFAULT_SERVER_PORT, |p| p.parse().unwrap());
        let mappings = port_mappings(&service);
        assert!(!mappings.is_empty(), "{rel} {name} publishes no port");
        for (_, container) in &mappings {
            assert_eq!(
                *container, server_port,
                "{rel} {name}: container port must be SERVER_PORT"
            );
        }
        if env_get(&env, "DISTRIBUTED_LOCK_ENABLED").as_deref() == Some("true") {
            assert_lease_timing(
                env_get(&env, "DISTRIBUTED_LOCK_TTL"),
                env_get(&env, "MAX_PROCESSING_TIME"),
                env_get(&env, "WEBHOOK_TIMEOUT"),
                &format!("{rel} {name}"),
            );
        }
    }
}

#[test]
fn compose_single_instance() {
    let rel = "compose/docker-compose.yml";
    let compose = yaml(rel);
    for svc in ["postgres", "redis", "webhook-sink", "dispatcher"] {
        assert!(
            compose["services"].get(svc).is_some(),
            "{rel} needs service {svc}"
        );
    }
    check_compose_common(rel, &compose);
    let dispatcher = &compose["services"]["dispatcher"];
    assert_eq!(
        port_mappings(dispatcher),
        [(Some(8080), 8080)],
        "{rel}: dispatcher on host port 8080"
    );
    let dispatchers = our_services(&compose)
        .into_iter()
        .filter(|(n, _)| n != "webhook-sink")
        .count();
    assert_eq!(dispatchers, 1, "{rel} runs exactly one dispatcher");
}

#[test]
fn compose_multi_instance() {
    let rel = "compose/docker-compose.multi-instance.yml";
    let compose = yaml(rel);
    let services = &compose["services"];
    for svc in ["postgres", "redis", "webhook-sink"] {
        assert!(services.get(svc).is_some(), "{rel} needs service {svc}");
    }
    // The Go quick start's commands use these names.
    assert_eq!(
        services["redis"]["container_name"].as_str(),
        Some("messages_redis_ha")
    );
    check_compose_common(rel, &compose);

    for i in 1..=3u64 {
        let name = format!("dispatcher-{i}");
        let svc = services
            .get(name.as_str())
            .unwrap_or_else(|| panic!("{rel} needs {name}"));
        assert_eq!(
            svc["container_name"].as_str(),
            Some(format!("message_dispatcher_{i}").as_str()),
            "{name}"
        );
        assert_eq!(
            port_mappings(svc),
            [(Some(8079 + i), 8080)],
            "{name}: host port {} -> 8080",
            8079 + i
        );
        let env = compose_env(svc);
        assert_eq!(
            env_get(&env, "DISTRIBUTED_LOCK_ENABLED").as_deref(),
            Some("true"),
            "{name}: lease enabled"
        );
        assert_eq!(
            env_get(&env, "LOG_LEVEL").as_deref(),
            Some("debug"),
            "{name}: standbys' skip messages are debug"
        );
        // Demo timings: failover within seconds, not the default 3 minutes.
        let ttl =
            duration(&env_get(&env, "DISTRIBUTED_LOCK_TTL").expect("a short DISTRIBUTED_LOCK_TTL"));
        assert!(
            ttl <= Duration::from_secs(60),
            "{name}: demo TTL should be short, is {ttl:?}"
        );
        let interval =
            duration(&env_get(&env, "PROCESSING_INTERVAL").expect("a short PROCESSING_INTERVAL"));
        assert!(
            interval <= Duration::from_secs(10),
            "{name}: demo interval should be short, is {interval:?}"
        );
    }
    let dispatchers = our_services(&compose)
        .into_iter()
        .filter(|(n, _)| n != "webhook-sink")
        .count();
    assert_eq!(dispatchers, 3, "{rel} runs exactly three dispatchers");
}

// ---------------------------------------------------------------- Kubernetes

fn k8s(file: &str) -> Value {
    yaml(&format!("k8s/{file}"))
}

fn configmap_data() -> Vec<(String, Option<String>)> {
    let cm = k8s("configmap.yaml");
    assert_eq!(cm["kind"].as_str(), Some("ConfigMap"));
    cm["data"]
        .as_mapping()
        .expect("configmap data")
        .iter()
        .map(|(k, v)| {
            let key = str_at(k, "configmap key").to_string();
            // kubectl rejects non-string ConfigMap values ("8080" not 8080).
            let value = v
                .as_str()
                .unwrap_or_else(|| panic!("configmap {key} must be a quoted string, is {v:?}"));
            (key, Some(value.to_string()))
        })
        .collect()
}

fn dispatcher_container(deploy: &Value) -> &Value {
    seq(
        &deploy["spec"]["template"]["spec"]["containers"],
        "containers",
    )
    .iter()
    .find(|c| c["name"].as_str() == Some("dispatcher"))
    .expect("a container named dispatcher (kubectl set image … dispatcher=…)")
}

#[test]
fn k8s_deployment() {
    let deploy = k8s("deployment.yaml");
    assert_eq!(deploy["kind"].as_str(), Some("Deployment"));
    let spec = &deploy["spec"];
    assert_eq!(spec["replicas"].as_u64(), Some(3));
    assert_eq!(
        spec["selector"]["matchLabels"]["app"].as_str(),
        Some("message-dispatcher")
    );
    assert_eq!(
        spec["template"]["metadata"]["labels"]["app"].as_str(),
        Some("message-dispatcher")
    );
    assert_eq!(spec["strategy"]["type"].as_str(), Some("RollingUpdate"));
    assert_eq!(
        spec["strategy"]["rollingUpdate"]["maxUnavailable"].as_u64(),
        Some(0)
    );

    let pod = &spec["template"]["spec"];
    let c = dispatcher_container(&deploy);
    let data = configmap_data();

    // Ports and probes.
    let port = seq(&c["ports"], "ports")[0].clone();
    let container_port = port["containerPort"].as_u64().expect("containerPort");
    let server_port =
        env_get(&data, "SERVER_PORT").map_or(DEFAULT_SERVER_PORT, |p| p.parse().unwrap());
    assert_eq!(
        container_port, server_port,
        "containerPort must be SERVER_PORT"
    );
    // Liveness reflects the process only (a database outage must not restart every replica),
    // readiness the dependencies.
    for (probe, path) in [
        ("startupProbe", "/livez"),
        ("livenessProbe", "/livez"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        let ok = get["port"].as_u64() == Some(container_port)
            || get["port"].as_str() == port["name"].as_str();
        assert!(
            ok && !get["port"].is_null(),
            "{probe} port must be the containerPort, is {:?}",
            get["port"]
        );
    }

    // Graceful stop: longer than one bounded cycle.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let mpt = duration(
        &env_get(&data, "MAX_PROCESSING_TIME").unwrap_or(DEFAULT_MAX_PROCESSING_TIME.into()),
    );
    assert!(
        grace > 30 && Duration::from_secs(grace) > mpt,
        "grace period {grace}s must exceed {mpt:?}"
    );

    // Hardening, matching the scratch image (numeric non-root user, no writes).
    let sc = &c["securityContext"];
    let pod_sc = &pod["securityContext"];
    assert!(
        sc["runAsNonRoot"].as_bool() == Some(true)
            || pod_sc["runAsNonRoot"].as_bool() == Some(true),
        "runAsNonRoot"
    );
    let uid = sc["runAsUser"]
        .as_u64()
        .or(pod_sc["runAsUser"].as_u64())
        .expect("runAsUser");
    assert_ne!(uid, 0);
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(strings(&sc["capabilities"]["drop"], "capabilities.drop")
        .iter()
        .any(|d| d == "ALL"));
    let seccomp = sc["seccompProfile"]["type"]
        .as_str()
        .or(pod_sc["seccompProfile"]["type"].as_str());
    assert_eq!(seccomp, Some("RuntimeDefault"));

    // Resources.
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                !c["resources"][kind][res].is_null(),
                "resources.{kind}.{res}"
            );
        }
    }

    // envFrom names the ConfigMap and Secret defined beside it.
    let env_from = seq(&c["envFrom"], "envFrom");
    let cm_name = k8s("configmap.yaml")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_name = k8s("secret.example.yaml")["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        env_from
            .iter()
            .any(|e| e["configMapRef"]["name"].as_str() == Some(&cm_name)),
        "envFrom {cm_name}"
    );
    assert!(
        env_from
            .iter()
            .any(|e| e["secretRef"]["name"].as_str() == Some(&secret_name)),
        "envFrom {secret_name}"
    );
    if let Some(env) = c["env"].as_sequence() {
        assert_known_env(
            env.iter()
                .map(|e| str_at(&e["name"], "env name").to_string()),
            "k8s deployment env",
        );
    }
}

#[test]
fn k8s_configmap_and_secret() {
    let data = configmap_data();
    assert_known_env(data.iter().map(|(k, _)| k.clone()), "k8s/configmap.yaml");
    assert_eq!(
        env_get(&data, "DISTRIBUTED_LOCK_ENABLED").as_deref(),
        Some("true")
    );
    assert_eq!(
        env_get(&data, "DB_HOST").as_deref(),
        Some("postgres-service")
    );
    assert_eq!(
        env_get(&data, "REDIS_HOST").as_deref(),
        Some("redis-service")
    );
    assert!(
        env_get(&data, "WEBHOOK_URL").is_some_and(|u| u.starts_with("http")),
        "WEBHOOK_URL"
    );
    assert_lease_timing(
        env_get(&data, "DISTRIBUTED_LOCK_TTL"),
        env_get(&data, "MAX_PROCESSING_TIME"),
        env_get(&data, "WEBHOOK_TIMEOUT"),
        "k8s/configmap.yaml",
    );
    for secret in [
        "DB_PASSWORD",
        "REDIS_PASSWORD",
        "API_TOKEN",
        "WEBHOOK_SECRET",
        "DATABASE_URL",
        "REDIS_URL",
    ] {
        assert!(
            env_get(&data, secret).is_none(),
            "{secret} belongs in the Secret, not the ConfigMap"
        );
    }

    let secret = k8s("secret.example.yaml");
    assert_eq!(secret["kind"].as_str(), Some("Secret"));
    let string_data = secret["stringData"]
        .as_mapping()
        .expect("secret stringData");
    let keys: Vec<String> = string_data
        .keys()
        .map(|k| str_at(k, "secret key").to_string())
        .collect();
    assert_known_env(keys.clone(), "k8s/secret.example.yaml");
    for key in [
        "DB_PASSWORD",
        "REDIS_PASSWORD",
        "API_TOKEN",
        "WEBHOOK_SECRET",
    ] {
        assert!(
            keys.iter().any(|k| k == key),
            "secret.example.yaml should show {key}"
        );
    }
    for (k, v) in string_data {
        assert!(v.is_string(), "secret {k:?} must be a string");
    }
    if let Some(ws) = string_data.get("WEBHOOK_SECRET").and_then(Value::as_str) {
        assert!(
            ws.starts_with("whsec_"),
            "WEBHOOK_SECRET has the form whsec_<base64>"
        );
    }
}

#[test]
fn k8s_service_pdb_and_kustomization() {
    let deploy = k8s("deployment.yaml");
    let c = dispatcher_container(&deploy);
    let port = &seq(&c["ports"], "ports")[0];

    let svc = k8s("service.yaml");
    assert_eq!(svc["kind"].as_str(), Some("Service"));
    assert_eq!(
        svc["spec"]["selector"]["app"].as_str(),
        Some("message-dispatcher")
    );
    let target = &seq(&svc["spec"]["ports"], "service ports")[0]["targetPort"];
    assert!(
        target.as_u64() == port["containerPort"].as_u64()
            || target.as_str() == port["name"].as_str(),
        "service targetPort {target:?} must be the container port"
    );

    let pdb = k8s("pdb.yaml");
    assert_eq!(pdb["kind"].as_str(), Some("PodDisruptionBudget"));
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["app"].as_str(),
        Some("message-dispatcher")
    );
    let min = pdb["spec"]["minAvailable"].as_u64();
    let max = pdb["spec"]["maxUnavailable"].as_u64();
    assert!(
        min.is_some_and(|m| (1..3).contains(&m)) || max == Some(1),
        "PDB keeps standbys: {min:?} {max:?}"
    );

    // The kustomization lists every manifest, and only existing ones.
    let kust = k8s("kustomization.yaml");
    let listed: BTreeSet<String> = strings(&kust["resources"], "resources")
        .into_iter()
        .collect();
    let on_disk: BTreeSet<String> = fs::read_dir(repo().join("k8s"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, on_disk,
        "k8s/kustomization.yaml resources vs files in k8s/"
    );
}

// ---------------------------------------------------------------- systemd

const UNIT: &str = "systemd/message-dispatcher.service";

/// (section, key, value) of every assignment in the unit.
fn unit_entries() -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in read(UNIT).lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "keep unit lines unbroken for this test: {line}"
        );
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
    }
    out
}

fn unit_values(key: &str) -> Vec<String> {
    unit_entries()
        .into_iter()
        .filter(|(s, k, _)| s == "Service" && k == key)
        .map(|(_, _, v)| v)
        .collect()
}

fn unit_value(key: &str) -> Option<String> {
    unit_values(key).pop()
}

#[test]
fn systemd_unit_contract() {
    let expect = |key: &str, value: &str| {
        assert_eq!(
            unit_value(key).as_deref(),
            Some(value),
            "{UNIT}: {key}={value}"
        );
    };
    expect("Type", "notify");
    expect("NotifyAccess", "main");
    expect("EnvironmentFile", "/etc/message-dispatcher/env");
    expect("ProtectSystem", "strict");
    expect("NoNewPrivileges", "yes");
    expect("Restart", "on-failure");
    expect("PrivateTmp", "yes");
    expect("ProtectHome", "yes");
    let exec = unit_value("ExecStart").expect("ExecStart");
    assert!(
        exec.starts_with("/usr/bin/message-dispatcher"),
        "ExecStart: {exec}"
    );

    let dynamic = unit_value("DynamicUser").as_deref() == Some("yes");
    let user = unit_value("User").filter(|u| !u.is_empty() && u != "root" && u != "0");
    assert!(
        dynamic || user.is_some(),
        "{UNIT}: DynamicUser=yes or a dedicated User="
    );

    // Present and empty: no capabilities at all.
    let caps = unit_values("CapabilityBoundingSet");
    assert!(
        !caps.is_empty() && caps.last().unwrap().is_empty(),
        "CapabilityBoundingSet= (empty): {caps:?}"
    );

    // The stop must outlast the graceful drain (MAX_PROCESSING_TIME, 30s by default).
    let stop = duration(&unit_value("TimeoutStopSec").expect("TimeoutStopSec"));
    assert!(
        stop > duration(DEFAULT_MAX_PROCESSING_TIME),
        "TimeoutStopSec {stop:?} must exceed 30s"
    );
    let watchdog = duration(&unit_value("WatchdogSec").expect("WatchdogSec"));
    assert!(
        watchdog > duration(DEFAULT_MAX_PROCESSING_TIME),
        "WatchdogSec {watchdog:?} must exceed one cycle"
    );

    // The daemon needs the network: denying addresses would break it.
    assert!(
        unit_value("PrivateNetwork").as_deref() != Some("yes"),
        "PrivateNetwork would cut DB/Redis/webhook"
    );
    assert!(
        unit_values("IPAddressDeny").is_empty(),
        "IPAddressDeny would cut DB/Redis/webhook"
    );
    let families = unit_value("RestrictAddressFamilies").expect("RestrictAddressFamilies");
    for af in ["AF_INET", "AF_INET6", "AF_UNIX"] {
        assert!(
            families.split_whitespace().any(|f| f == af),
            "RestrictAddressFamilies needs {af}"
        );
    }
}

#[test]
fn systemd_env_example_mentions_every_variable_and_no_other() {
    let text = read("systemd/env.example");
    let mut set = BTreeSet::new();
    let mut mentioned = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let (commented, body) = match line.strip_prefix('#') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, line),
        };
        let Some((key, _)) = body.split_once('=') else {
            continue;
        };
        // Only assignments (KEY=…), not prose that happens to contain '='.
        if key.is_empty()
            || !key
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            assert!(commented, "env.example line is not KEY=value: {line}");
            continue;
        }
        if !commented {
            assert!(set.insert(key.to_string()), "env.example sets {key} twice");
        }
        mentioned.push(key.to_string());
    }
    assert_known_env(mentioned.iter().cloned(), "systemd/env.example");
    assert!(
        set.contains("WEBHOOK_URL"),
        "env.example must set WEBHOOK_URL (required by serve)"
    );
    // A reader should find every variable documented there.
    for name in ENV_VARS {
        assert!(
            mentioned.iter().any(|m| m == name),
            "env.example should mention {name}"
        );
    }
}

/// Finds an executable on PATH (std only).
fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs a command with a deadline; returns (success, stdout, stderr).
fn run(cmd: &mut Command) -> (bool, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within 60s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A private copy of the unit whose ExecStart names an existing binary, since
/// `verify` rejects a missing /usr/bin/message-dispatcher.
fn unit_copy_with_existing_binary(tag: &str) -> Option<(PathBuf, PathBuf)> {
    let stand_in = ["/bin/true", "/usr/bin/true"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())?;
    let dir = std::env::temp_dir().join(format!("md-deploy-test-{}-{tag}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let text = read(UNIT).replace(
        "ExecStart=/usr/bin/message-dispatcher",
        &format!("ExecStart={}", stand_in.display()),
    );
    let path = dir.join("message-dispatcher.service");
    fs::write(&path, text).unwrap();
    Some((dir, path))
}

#[test]
fn systemd_analyze_verify() {
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("note: systemd-analyze not installed; skipping `systemd-analyze verify`");
        return;
    };
    let Some((dir, unit)) = unit_copy_with_existing_binary("verify") else {
        eprintln!("note: no /bin/true to stand in for the binary; skipping verify");
        return;
    };
    let (ok, stdout, stderr) = run(Command::new(&analyze).arg("verify").arg(&unit));
    let _ = fs::remove_dir_all(&dir);
    // Problems with our file are reported as "<path>:<line>: …" or name the unit.
    let ours: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .filter(|l| l.contains("message-dispatcher.service"))
        .collect();
    assert!(
        ok && ours.is_empty(),
        "systemd-analyze verify failed:\n{stdout}\n{stderr}"
    );
}

#[test]
fn systemd_analyze_security_exposure_at_most_2() {
    let Some(analyze) = which("systemd-analyze") else {
        eprintln!("note: systemd-analyze not installed; skipping the security score");
        return;
    };
    let (_, help, help_err) = run(Command::new(&analyze).args(["security", "--help"]));
    if !help.contains("--offline") && !help_err.contains("--offline") {
        eprintln!("note: this systemd-analyze has no --offline (systemd < 250); skipping the security score");
        return;
    }
    let unit = repo().join(UNIT);
    let (_, stdout, stderr) = run(Command::new(&analyze)
        .args(["security", "--offline=true"])
        .arg(&unit));
    let line = stdout
        .lines()
        .chain(stderr.lines())
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in output:\n{stdout}\n{stderr}"));
    let score: f64 = line
        .rsplit(": ")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse exposure from {line:?}"));
    eprintln!("systemd-analyze security: {score}");
    assert!(
        score <= 2.0,
        "exposure {score} > 2.0; tighten the sandbox:\n{stdout}"
    );
}

// ---------------------------------------------------------------- docs

#[test]
fn deploy_doc_refers_to_existing_files() {
    let doc = read("docs/deploy.md");
    for needle in [
        "compose/docker-compose.yml",
        "compose/docker-compose.multi-instance.yml",
        "systemd/message-dispatcher.service",
        "systemd/env.example",
        "k8s/",
        "Lock acquired",
        "Another instance is processing, skipping this cycle",
        "message_dispatcher_1",
        "messages_redis_ha",
    ] {
        assert!(
            doc.contains(needle),
            "docs/deploy.md should mention {needle}"
        );
    }
    // Every repository path the doc names exists.
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "/._-".contains(c);
    for prefix in ["compose/", "systemd/", "k8s/"] {
        for (i, _) in doc.match_indices(prefix) {
            if i > 0 && is_path_char(doc[..i].chars().last().unwrap()) {
                continue; // part of a longer path, e.g. /etc/systemd/
            }
            let path: String = doc[i..].chars().take_while(|&c| is_path_char(c)).collect();
            let path = path.trim_end_matches('.');
            assert!(
                repo().join(path).exists(),
                "docs/deploy.md names {path}, which does not exist"
            );
        }
    }
}
