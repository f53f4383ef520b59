//! Unit tests of the language: each stdlib function against buildx's documented examples,
//! matrices, inherits, variables and their environment overrides, `--set`, compose, errors.

use crate::lang::eval_text;
use crate::stdlib::{Clock, UNSUPPORTED};
use crate::value::Value;
use crate::{load, print_json, resolve_with, Error, Request, Resolved, SourceFile};

fn clock() -> Clock {
    Clock {
        now: 1_700_000_000,
        home: "/home/user".into(),
    }
}

/// Functions whose documented result depends on the moment, randomness or the machine.
const NONDETERMINISTIC: &[&str] = &["timestamp", "uuidv4", "homedir", "bcrypt"];

/// Examples whose documented result is not what buildx (go-cty) returns, each checked
/// against go-cty's implementation: the docs are wrong there, not buildx.
const DOCS_WRONG: &[(&str, &str)] = &[
    ("greaterthan", "2 > 5 is false"),
    ("indent", "go-cty's indent leaves the first line alone"),
    (
        "regex_replace",
        "go-cty's parameters are (string, pattern, replacement)",
    ),
    (
        "title",
        "Go's strings.Title does not start a word after '_'",
    ),
    (
        "replace",
        "\"banana\" with every \"na\" replaced by \"--\" is \"ba----\"",
    ),
];

#[test]
fn stdlib_matches_buildx_docs_examples() {
    let cases = include_str!("../tests/data/buildx-stdlib/cases.tsv");
    let (mut checked, mut failures) = (0, Vec::new());
    for line in cases
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let parts: Vec<&str> = line.split('\t').collect();
        let (name, expr, want) = (parts[0], parts[1], parts[2]);
        if UNSUPPORTED.contains(&name)
            || NONDETERMINISTIC.contains(&name)
            || DOCS_WRONG.iter().any(|(n, _)| *n == name)
        {
            continue;
        }
        // Results the docs abbreviate ("...") or misquote cannot be compared.
        let Ok(want_v) = eval_text(want, &clock()) else {
            continue;
        };
        checked += 1;
        match eval_text(expr, &clock()) {
            Ok(got) if same(&got, &want_v) => {}
            other => failures.push(format!("{name}: {expr} gave {other:?}, docs say {want}")),
        }
    }
    assert!(checked > 70, "only {checked} documented examples checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Equal, or equal once both are strings (the docs write `"5"` and `5` loosely).
fn same(a: &Value, b: &Value) -> bool {
    a == b || (a.to_str().is_some() && a.to_str() == b.to_str())
}

fn eval(text: &str) -> Value {
    eval_text(text, &clock()).unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[test]
fn operators_and_templates() {
    assert_eq!(
        eval(r#""a-${1 + 2}-${true ? "x" : "y"}""#),
        Value::String("a-3-x".into())
    );
    assert_eq!(
        eval(r#"[for s in ["a", "b"] : upper(s)]"#),
        eval(r#"["A", "B"]"#)
    );
    assert_eq!(
        eval(r#"{for k, v in {a = 1} : v => k}"#),
        eval(r#"{"1" = "a"}"#)
    );
    assert_eq!(
        eval(r#""%{ for x in ["a", "b"] }${x},%{ endfor }""#),
        Value::String("a,b,".into())
    );
    assert_eq!(eval(r#"[{a = 1}, {a = 2}][*].a"#), eval("[1, 2]"));
    assert_eq!(
        eval(r#"format("%-4s|%03d|%.2f|%q", "ab", 7, 3.14159, "x")"#),
        Value::String("ab  |007|3.14|\"x\"".into())
    );
    assert_eq!(
        eval(r#"formatdate("DD MMM YYYY hh:mm ZZZ", "2024-03-05T07:08:09Z")"#),
        Value::String("05 Mar 2024 07:08 UTC".into())
    );
    assert_eq!(
        eval("timestamp()"),
        Value::String("2023-11-14T22:13:20Z".into())
    );
    assert_eq!(
        eval(r#"regex_replace("v1.2.3", "^v([0-9]+)\\..*$", "$1")"#),
        Value::String("1".into())
    );
    assert_eq!(
        eval(r#"trimprefix("refs/tags/v1", "refs/tags/")"#),
        Value::String("v1".into())
    );
}

#[test]
fn wrong_arity_is_an_error() {
    let e = eval_text(r#"lower("a", "b")"#, &clock()).unwrap_err();
    assert!(e.contains("expects 1 argument"), "{e}");
}

fn files(list: &[(&str, &str)]) -> Vec<SourceFile> {
    list.iter()
        .map(|(n, t)| SourceFile {
            name: n.to_string(),
            text: t.to_string(),
        })
        .collect()
}

fn run(
    list: &[(&str, &str)],
    targets: &[&str],
    sets: &[&str],
    env: &[(&str, &str)],
) -> Result<Resolved, Error> {
    let def = load(&files(list))?;
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let targets: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    resolve_with(
        &def,
        &Request {
            targets: &targets,
            overrides: &sets,
            env: &lookup,
            builtins: crate::default_builtins(),
            clock: clock(),
        },
    )
}

fn hcl(
    text: &str,
    targets: &[&str],
    sets: &[&str],
    env: &[(&str, &str)],
) -> Result<Resolved, Error> {
    run(&[("docker-bake.hcl", text)], targets, sets, env)
}

#[test]
fn matrix_expands_with_names_and_tags() {
    let r = hcl(
        r#"
target "app" {
  name = "app-${tgt}-${replace(version, ".", "-")}"
  matrix = { tgt = ["foo", "bar"], version = ["1.0", "2.0"] }
  target = tgt
  tags = ["r/app:${tgt}-${version}"]
}"#,
        &["app"],
        &[],
        &[],
    )
    .unwrap();
    let names: Vec<&String> = r.targets.keys().collect();
    assert_eq!(
        names,
        ["app-bar-1-0", "app-bar-2-0", "app-foo-1-0", "app-foo-2-0"]
    );
    assert_eq!(
        r.targets["app-foo-2-0"].tags,
        Some(vec!["r/app:foo-2.0".to_string()])
    );
    assert_eq!(r.groups["app"].targets.len(), 4);
}

#[test]
fn huge_matrix_is_refused() {
    let e = hcl(
        r#"target "x" {
  name = "x-${a}-${b}"
  matrix = { a = range(100), b = range(100) }
}"#,
        &["x"],
        &[],
        &[],
    )
    .unwrap_err();
    assert!(matches!(e, Error::Limit { .. }), "{e}");
}

#[test]
fn inherits_apply_in_order_and_own_attributes_win() {
    let r = hcl(
        r#"
target "a" {
  args = { X = "a", A = "1" }
  tags = ["a"]
}
target "b" {
  args = { X = "b" }
  platforms = ["linux/arm64"]
}
target "c" {
  inherits = ["a", "b"]
  tags = ["c"]
}"#,
        &["c"],
        &[],
        &[],
    )
    .unwrap();
    let c = &r.targets["c"];
    assert_eq!(c.args["X"], Some("b".into()));
    assert_eq!(c.args["A"], Some("1".into()));
    assert_eq!(c.tags, Some(vec!["c".to_string()]));
    assert_eq!(c.platforms, Some(vec!["linux/arm64".to_string()]));
}

#[test]
fn variables_take_environment_overrides_with_types() {
    let text = r#"
variable "TAG" {
  default = "latest"
}
variable "N" {
  default = 1
}
variable "ON" {
  default = false
}
variable "LIST" {
  type = list(string)
  default = []
}
variable "OBJ" {
  type = map(string)
  default = {}
}
target "app" {
  tags = concat(["r/app:${TAG}"], LIST)
  args = merge({ N = add(N, 1), ON = ON ? "yes" : "no" }, OBJ)
}"#;
    let r = hcl(
        text,
        &["app"],
        &[],
        &[
            ("TAG", "v2"),
            ("N", "41"),
            ("ON", "true"),
            ("LIST", "a,b"),
            ("OBJ_JSON", r#"{"k":"v"}"#),
        ],
    )
    .unwrap();
    let app = &r.targets["app"];
    assert_eq!(
        app.tags,
        Some(vec!["r/app:v2".into(), "a".into(), "b".into()])
    );
    assert_eq!(app.args["N"], Some("42".into()));
    assert_eq!(app.args["ON"], Some("yes".into()));
    assert_eq!(app.args["k"], Some("v".into()));
    let e = hcl(text, &["app"], &[], &[("N", "many")]).unwrap_err();
    assert!(
        e.to_string().contains("docker-bake.hcl:5: variable \"N\""),
        "{e}"
    );
}

#[test]
fn user_functions_and_target_references() {
    let r = hcl(
        r#"
function "tag" {
  params = [name, version]
  variadic_params = extra
  result = concat(["r/${name}:${version}"], extra)
}
target "base" { tags = tag("base", "1", "r/base:latest") }
target "app" {
  tags = [for t in target.base.tags : replace(t, "base", "app")]
  contexts = { base = "target:base" }
}"#,
        &["app"],
        &[],
        &[],
    )
    .unwrap();
    assert_eq!(
        r.targets["app"].tags,
        Some(vec!["r/app:1".into(), "r/app:latest".into()])
    );
    // The linked target is built too, for its cache only.
    assert_eq!(
        r.targets["base"].output.as_ref().unwrap()[0].kind,
        "cacheonly"
    );
}

#[test]
fn set_overrides_match_patterns_and_append() {
    let text = r#"
target "foo-a" {
  tags = ["a"]
  platforms = ["linux/amd64"]
}
target "foo-b" {
  tags = ["b"]
}
target "bar" {
  tags = ["c"]
}
group "default" {
  targets = ["foo-a", "foo-b", "bar"]
}"#;
    let r = hcl(
        text,
        &[],
        &[
            "*.platform=linux/arm64",
            "foo*.tags+=extra",
            "bar.args.X=1",
            "foo-?.no-cache",
        ],
        &[],
    )
    .unwrap();
    for t in r.targets.values() {
        assert_eq!(t.platforms, Some(vec!["linux/arm64".to_string()]));
    }
    assert_eq!(
        r.targets["foo-a"].tags,
        Some(vec!["a".into(), "extra".into()])
    );
    assert_eq!(r.targets["bar"].tags, Some(vec!["c".into()]));
    assert_eq!(r.targets["bar"].args["X"], Some("1".into()));
    assert_eq!(r.targets["foo-b"].no_cache, Some(true));
    assert!(hcl(text, &[], &["nomatch*.tags=x"], &[]).is_err());
}

#[test]
fn compose_services_with_build_become_targets() {
    let r = run(
        &[(
            "compose.yaml",
            r#"
services:
  db:
    image: postgres
  web.app:
    image: r/web:${TAG:-dev}
    build:
      context: ./web
      dockerfile: web.Dockerfile
      args:
        - A=1
        - B
      cache_from: [r/web:cache]
      x-bake:
        platforms: [linux/amd64, linux/arm64]
        tags: r/web:extra
  worker:
    build: ./worker
    environment:
      B: from-service
    x-bake:
      no-cache: true
"#,
        )],
        &[],
        &[],
        &[("B", "from-env")],
    )
    .unwrap();
    assert_eq!(r.groups["default"].targets, ["web_app", "worker"]);
    let web = &r.targets["web_app"];
    assert_eq!(web.context.as_deref(), Some("./web"));
    assert_eq!(web.args["B"], Some("from-env".into()));
    assert_eq!(web.tags, Some(vec!["r/web:extra".into()]));
    assert_eq!(web.platforms.as_ref().unwrap().len(), 2);
    assert_eq!(web.cache_from.as_ref().unwrap()[0].to_csv(), "r/web:cache");
    assert_eq!(r.targets["worker"].context.as_deref(), Some("./worker"));
}

fn err(text: &str, targets: &[&str]) -> String {
    hcl(text, targets, &[], &[]).unwrap_err().to_string()
}

#[test]
fn errors_name_file_line_and_attribute() {
    assert_eq!(
        err("target \"a\" {}\n", &["nope"]),
        "failed to find target nope"
    );
    let e = err(
        "target \"a\" {\n  inherits = [\"b\"]\n}\ntarget \"b\" {\n  inherits = [\"a\"]\n}\n",
        &["a"],
    );
    assert!(
        e.starts_with("docker-bake.hcl:") && e.contains("inherits cycle"),
        "{e}"
    );
    let e = err("target \"a\" {\n  contexts = { x = \"target:b\" }\n}\ntarget \"b\" {\n  contexts = { y = \"target:a\" }\n}\n", &["a"]);
    assert!(e.contains("infinite loop"), "{e}");
    let e = err("target \"a\" {\n  tags = [\"${MISSING}\"]\n}\n", &["a"]);
    assert!(
        e.starts_with("docker-bake.hcl:2: target \"a\".tags")
            && e.contains("unknown variable \"MISSING\""),
        "{e}"
    );
    let e = err(
        "target \"a\" {\n\n  args = { X = upper(\"a\", \"b\") }\n}\n",
        &["a"],
    );
    assert!(
        e.starts_with("docker-bake.hcl:3:") && e.contains("expects 1 argument"),
        "{e}"
    );
    let e = err("target \"a\" {\n  tags = [\"x\"\n", &["a"]);
    assert!(e.starts_with("docker-bake.hcl:"), "{e}");
    let e = err("target \"a\" {\n  colour = \"red\"\n}\n", &["a"]);
    assert!(e.contains("colour"), "{e}");
    let e = err(
        &format!(
            "target \"a\" {{ tags = {}1{} }}",
            "[".repeat(500),
            "]".repeat(500)
        ),
        &["a"],
    );
    assert!(e.contains("nest"), "{e}");
    let e = err(
        "function \"f\" {\n  params = [x]\n  result = f(x)\n}\ntarget \"a\" { tags = f(1) }\n",
        &["a"],
    );
    assert!(e.contains("nest"), "{e}");
}

#[test]
fn print_shape_and_escaping() {
    let r = hcl(
        "target \"default\" {\n  dockerfile-inline = \"FROM a <<EOF\"\n}\n",
        &[],
        &[],
        &[],
    )
    .unwrap();
    let out = print_json(&r);
    assert!(
        out.starts_with(
            "{\n  \"group\": {\n    \"default\": {\n      \"targets\": [\n        \"default\"\n"
        ),
        "{out}"
    );
    assert!(out.contains("\\u003c\\u003cEOF"), "{out}");
}
