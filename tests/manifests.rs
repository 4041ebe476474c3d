//! Offline checks of the deployment files: the Kubernetes manifests under deploy/k8s (base and
//! overlays) against the Kubernetes API schemas, the compose files against the Compose
//! Specification, the kustomizations' references, the references between the objects they
//! make, and every stormd container's configuration through stormd itself.
//!
//! The validators (kubernetes-validate, check-jsonschema) live in a Python venv that
//! deploy/tools-venv.sh makes at target/tools-venv (pinned versions, their schemas inside: no
//! network once installed). Without python3 every test says SKIPPED on stderr and passes;
//! any other failure fails with the tool's whole output. Each validator also gets a broken
//! copy that it must reject, so a validator that accepts anything cannot pass.
//!
//! kubectl and kustomize are not needed: a small renderer here applies each kustomization
//! (resources, generators, strategic-merge patches on the fields the patches use). When
//! kubectl is installed, `kubectl kustomize` renders each one too, and its output must
//! validate and agree with the small renderer.

use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The Kubernetes version the manifests must be valid for (kubernetes-validate ships the
/// schemas of 1.25 to 1.37).
const K8S_VERSION: &str = "1.30.0";
const STORMD: &str = env!("CARGO_BIN_EXE_stormd");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn k8s_dir() -> PathBuf {
    root().join("deploy/k8s")
}

fn show(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// A scratch directory of this test (under Cargo's per-target tmp), emptied first.
fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("manifests-{test}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------
// The tools

struct Tools {
    bin: PathBuf,
}

/// Installs (once, whichever test process comes first: the script locks) and returns the
/// validators, or None after a loud SKIPPED when python3 is missing.
fn tools(test: &str) -> Option<Tools> {
    let has_python = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_python {
        eprintln!(
            "\n*** SKIPPED {test}: python3 is not installed, so the manifest validators \
             (deploy/tools-venv.sh) cannot run. Install python3 to check deploy/k8s and the \
             compose files. ***\n"
        );
        return None;
    }
    let out = run(Command::new("bash")
        .arg(root().join("deploy/tools-venv.sh"))
        .current_dir(root()));
    assert!(
        out.status.success(),
        "{}",
        show("deploy/tools-venv.sh", &out)
    );
    let bin = root().join("target/tools-venv/bin");
    for tool in ["python", "kubernetes-validate", "check-jsonschema"] {
        assert!(
            bin.join(tool).exists(),
            "deploy/tools-venv.sh made no {tool} in {bin:?}"
        );
    }
    Some(Tools { bin })
}

impl Tools {
    fn cmd(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.current_dir(root());
        cmd
    }

    /// Every document of a YAML file, as JSON (PyYAML from the venv: YAML 1.1, merge keys).
    fn yaml(&self, path: &Path) -> Vec<Value> {
        const SCRIPT: &str = "import json, sys, yaml\n\
            with open(sys.argv[1]) as f:\n    \
                docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
            json.dump(docs, sys.stdout, default=str)\n";
        let out = run(self.cmd("python").arg("-c").arg(SCRIPT).arg(path));
        assert!(
            out.status.success(),
            "{}",
            show(&format!("parsing {path:?}"), &out)
        );
        match serde_json::from_slice(&out.stdout) {
            Ok(Value::Array(docs)) => docs,
            other => panic!("parsing {path:?} gave {other:?}"),
        }
    }

    fn yaml_one(&self, path: &Path) -> Value {
        let mut docs = self.yaml(path);
        assert_eq!(docs.len(), 1, "{path:?}: expected one YAML document");
        docs.remove(0)
    }

    /// kubernetes-validate, strict, against K8S_VERSION. Ok(number of resources passed) only
    /// when it exits 0, every resource passed and nothing was skipped (an unknown kind or
    /// apiVersion is only a WARN for the tool: here it is a failure). Err(its whole output).
    fn k8s_validate(&self, files: &[PathBuf]) -> Result<usize, String> {
        let out = run(self
            .cmd("kubernetes-validate")
            .args(["-k", K8S_VERSION, "--strict"])
            .args(files));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let passed = stdout.lines().filter(|l| l.starts_with("INFO ")).count();
        let bad = stdout
            .lines()
            .any(|l| !l.starts_with("INFO ") && !l.trim().is_empty());
        if out.status.success() && !bad && out.stderr.is_empty() && passed > 0 {
            Ok(passed)
        } else {
            Err(show("kubernetes-validate", &out))
        }
    }

    /// check-jsonschema with the Compose Specification it ships.
    fn compose_validate(&self, files: &[PathBuf]) -> Result<(), String> {
        let out = run(self
            .cmd("check-jsonschema")
            .args(["--builtin-schema", "vendor.compose-spec"])
            .args(files));
        if out.status.success() {
            Ok(())
        } else {
            Err(show(
                "check-jsonschema --builtin-schema vendor.compose-spec",
                &out,
            ))
        }
    }
}

/// Writes JSON documents as one multi-document YAML file (JSON is YAML).
fn write_docs(path: &Path, docs: &[Value]) -> PathBuf {
    let text: Vec<String> = docs
        .iter()
        .map(|d| serde_json::to_string_pretty(d).unwrap())
        .collect();
    fs::write(path, text.join("\n---\n")).unwrap();
    path.to_path_buf()
}

// ---------------------------------------------------------------------------------------
// Kustomizations

/// Every kustomization: base first, then each overlay.
fn kustomization_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![k8s_dir().join("base")];
    let mut overlays: Vec<PathBuf> = fs::read_dir(k8s_dir().join("overlays"))
        .expect("deploy/k8s/overlays")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    overlays.sort();
    assert!(
        !overlays.is_empty(),
        "no overlays under deploy/k8s/overlays"
    );
    dirs.extend(overlays);
    for dir in &dirs {
        assert!(
            dir.join("kustomization.yaml").is_file(),
            "{dir:?} has no kustomization.yaml"
        );
    }
    dirs
}

fn strings(v: &Value, what: &str) -> Vec<String> {
    match v {
        Value::Null => vec![],
        Value::Array(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .unwrap_or_else(|| panic!("{what}: {i} is not a string"))
                    .to_string()
            })
            .collect(),
        other => panic!("{what}: expected a list, found {other}"),
    }
}

/// A generator's `files` entry: `path` or `key=path`.
fn generator_file(entry: &str) -> (String, String) {
    match entry.split_once('=') {
        Some((key, path)) => (key.to_string(), path.to_string()),
        None => {
            let key = Path::new(entry).file_name().unwrap().to_string_lossy();
            (key.into_owned(), entry.to_string())
        }
    }
}

/// What a kustomization makes, rendered here: its objects, and for each generated ConfigMap
/// or Secret (by kind and name, before kustomize's hash suffix) its keys' source files.
#[derive(Default)]
struct Rendered {
    objects: Vec<Value>,
    generated: BTreeMap<(String, String), BTreeMap<String, PathBuf>>,
}

fn kind_name(obj: &Value) -> (String, String) {
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (kind, name)
}

impl Rendered {
    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| kind_name(o) == (kind.to_string(), name.to_string()))
    }

    fn of_kind<'a>(&'a self, kinds: &'a [&str]) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .iter()
            .filter(move |o| kinds.contains(&o["kind"].as_str().unwrap_or_default()))
    }

    /// The local file behind `path` as `container` sees it (a mounted ConfigMap or Secret
    /// made by a generator), if any.
    fn local_file(&self, pod: &Value, container: &Value, path: &str) -> Option<PathBuf> {
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let at = mount["mountPath"].as_str()?;
            let Some(key) = path.strip_prefix(&format!("{at}/")) else {
                continue;
            };
            let volume = pod["volumes"]
                .as_array()?
                .iter()
                .find(|v| v["name"] == mount["name"])?;
            let source = if let Some(name) = volume["configMap"]["name"].as_str() {
                ("ConfigMap".to_string(), name.to_string())
            } else if let Some(name) = volume["secret"]["secretName"].as_str() {
                ("Secret".to_string(), name.to_string())
            } else {
                continue;
            };
            return self.generated.get(&source)?.get(key).cloned();
        }
        None
    }
}

/// The merge key of a list field in a strategic merge patch (the fields these manifests
/// patch); other lists are replaced, as kustomize does for lists without one.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "env" | "volumes" | "imagePullSecrets" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        "ports" => Some("containerPort"),
        _ => None,
    }
}

fn merge(target: &mut Value, patch: &Value, at: &str) {
    let (Value::Object(target), Value::Object(patch)) = (&mut *target, patch) else {
        *target = patch.clone();
        return;
    };
    for (field, value) in patch {
        assert!(
            !field.starts_with('$'),
            "{at}.{field}: patch directives are not supported here"
        );
        let here = format!("{at}.{field}");
        match (target.get_mut(field), merge_key(field), value) {
            (Some(Value::Array(items)), Some(key), Value::Array(patched)) => {
                // Items new to the list go first, in the patch's order (as kustomize does).
                let mut added = vec![];
                for p in patched {
                    match items.iter_mut().find(|i| i[key] == p[key]) {
                        Some(item) => merge(item, p, &format!("{here}[{}]", p[key])),
                        None => added.push(p.clone()),
                    }
                }
                items.splice(0..0, added);
            }
            (Some(existing), _, _) => merge(existing, value, &here),
            (None, _, _) => {
                target.insert(field.clone(), value.clone());
            }
        }
    }
}

fn containers(obj: &Value) -> &[Value] {
    obj["spec"]["template"]["spec"]["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// Renders the kustomization in `dir` as kustomize would (without name hashes), checking on
/// the way that each patch names an object and containers that exist.
fn render(tools: &Tools, dir: &Path) -> Rendered {
    let k = tools.yaml_one(&dir.join("kustomization.yaml"));
    let mut out = Rendered::default();
    for r in strings(&k["resources"], "resources") {
        let path = dir.join(&r);
        if path.is_dir() {
            let sub = render(tools, &path);
            out.objects.extend(sub.objects);
            out.generated.extend(sub.generated);
        } else {
            out.objects.extend(tools.yaml(&path));
        }
    }
    for (field, kind) in [
        ("configMapGenerator", "ConfigMap"),
        ("secretGenerator", "Secret"),
    ] {
        for generator in k[field].as_array().into_iter().flatten() {
            let name = generator["name"]
                .as_str()
                .expect("generator name")
                .to_string();
            let mut data = Map::new();
            let mut files = BTreeMap::new();
            for entry in strings(&generator["files"], field) {
                let (key, file) = generator_file(&entry);
                let text = fs::read_to_string(dir.join(&file))
                    .unwrap_or_else(|e| panic!("{dir:?}: {field} {name}: {file}: {e}"));
                data.insert(key.clone(), Value::String(text));
                files.insert(key, dir.join(file));
            }
            let data_field = if kind == "Secret" {
                "stringData"
            } else {
                "data"
            };
            let mut obj = json!({"apiVersion": "v1", "kind": kind, "metadata": {"name": name}});
            obj[data_field] = Value::Object(data);
            if kind == "Secret" {
                obj["type"] = json!("Opaque");
            }
            out.objects.push(obj);
            out.generated.insert((kind.to_string(), name), files);
        }
    }
    for patch in k["patches"].as_array().into_iter().flatten() {
        assert!(
            patch.get("target").is_none() && patch.get("patch").is_none(),
            "{dir:?}: only `patches: - path: FILE` (strategic merge) is checked here: {patch}"
        );
        let file = patch["path"].as_str().expect("patch path");
        for doc in tools.yaml(&dir.join(file)) {
            let (kind, name) = kind_name(&doc);
            let defined: Vec<String> = out
                .objects
                .iter()
                .map(|o| {
                    let (kind, name) = kind_name(o);
                    format!("{kind}/{name}")
                })
                .collect();
            let target = out
                .objects
                .iter_mut()
                .find(|o| kind_name(o) == (kind.clone(), name.clone()))
                .unwrap_or_else(|| {
                    panic!(
                        "{dir:?}: patch {file} targets {kind}/{name}, which its resources do \
                         not define (they define {defined:?})"
                    )
                });
            assert_eq!(
                target["apiVersion"], doc["apiVersion"],
                "{dir:?}: patch {file}"
            );
            for c in containers(&doc) {
                assert!(
                    containers(target).iter().any(|t| t["name"] == c["name"]),
                    "{dir:?}: patch {file} names container {} that {kind}/{name} does not \
                     have (a strategic merge would add a container without an image)",
                    c["name"]
                );
            }
            merge(target, &doc, &format!("{kind}/{name}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The tests

#[test]
fn tools_venv_is_idempotent_and_quiet() {
    let Some(_tools) = tools("tools_venv_is_idempotent_and_quiet") else {
        return;
    };
    // Installed now (by this test or another): a second run changes nothing and says nothing.
    let out = run(Command::new("bash")
        .arg(root().join("deploy/tools-venv.sh"))
        .current_dir(root()));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        show("deploy/tools-venv.sh run again", &out)
    );
}

#[test]
fn kubernetes_manifests_pass_strict_schema_validation() {
    let Some(tools) = tools("kubernetes_manifests_pass_strict_schema_validation") else {
        return;
    };
    let tmp = scratch("k8s-valid");
    // Every resource file as written...
    let mut files = vec![];
    for dir in kustomization_dirs() {
        let k = tools.yaml_one(&dir.join("kustomization.yaml"));
        for r in strings(&k["resources"], "resources") {
            if dir.join(&r).is_file() {
                files.push(dir.join(r));
            }
        }
    }
    let expected: usize = files.iter().map(|f| tools.yaml(f).len()).sum();
    match tools.k8s_validate(&files) {
        Ok(n) => assert_eq!(n, expected, "resources validated, of {files:?}"),
        Err(out) => panic!("resource files of deploy/k8s rejected:\n{out}"),
    }
    // ...and what each kustomization makes of them (patches applied, generators included).
    for dir in kustomization_dirs() {
        let rendered = render(&tools, &dir);
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let file = write_docs(&tmp.join(format!("{name}.yaml")), &rendered.objects);
        match tools.k8s_validate(std::slice::from_ref(&file)) {
            Ok(n) => assert_eq!(n, rendered.objects.len(), "{dir:?} rendered"),
            Err(out) => panic!("{dir:?} rendered (in {file:?}) is rejected:\n{out}"),
        }
    }
    let _ = fs::remove_dir_all(tmp);
}

#[test]
fn kubernetes_validator_rejects_broken_manifests() {
    let Some(tools) = tools("kubernetes_validator_rejects_broken_manifests") else {
        return;
    };
    let tmp = scratch("k8s-broken");
    let good = tools.yaml_one(&k8s_dir().join("base/manager-deployment.yaml"));
    let control = write_docs(&tmp.join("good.yaml"), std::slice::from_ref(&good));
    if let Err(out) = tools.k8s_validate(&[control]) {
        panic!("the unbroken copy must pass, or the controls prove nothing:\n{out}");
    }
    let mut breakages: Vec<(&str, Value)> = vec![];
    let mut v = good.clone();
    v["spec"]["replicas"] = json!("two");
    breakages.push(("replicas: \"two\"", v));
    let mut v = good.clone();
    v["spec"]["replica"] = json!(1);
    breakages.push(("an unknown field (strict mode)", v));
    let mut v = good.clone();
    v["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"] = json!(5000);
    breakages.push(("a number for a protocol", v));
    let mut v = good.clone();
    v["kind"] = json!("Deploymnet");
    breakages.push(("an unknown kind (only a WARN for the tool)", v));
    for (i, (what, doc)) in breakages.into_iter().enumerate() {
        let file = write_docs(&tmp.join(format!("broken-{i}.yaml")), &[doc]);
        match tools.k8s_validate(&[file]) {
            Err(out) => assert!(
                out.contains("ERROR") || out.contains("WARN"),
                "{what}: rejected, but not for a schema reason:\n{out}"
            ),
            Ok(_) => panic!("kubernetes-validate accepted a Deployment with {what}"),
        }
    }
    let _ = fs::remove_dir_all(tmp);
}

fn compose_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("docker-compose.yml")];
    let stack = root().join("deploy/swarm/stack.yml");
    if stack.is_file() {
        files.push(stack);
    }
    files
}

#[test]
fn compose_files_follow_the_compose_specification() {
    let Some(tools) = tools("compose_files_follow_the_compose_specification") else {
        return;
    };
    let files = compose_files();
    if let Err(out) = tools.compose_validate(&files) {
        panic!("{files:?} do not follow the Compose Specification:\n{out}");
    }
}

#[test]
fn compose_validator_rejects_broken_files() {
    let Some(tools) = tools("compose_validator_rejects_broken_files") else {
        return;
    };
    let tmp = scratch("compose-broken");
    let good = "services:\n  manager:\n    image: stormdht:latest\n    ports:\n      - \"127.0.0.1:5000:5000/udp\"\n";
    fs::write(tmp.join("good.yml"), good).unwrap();
    if let Err(out) = tools.compose_validate(&[tmp.join("good.yml")]) {
        panic!("the unbroken compose file must pass, or the controls prove nothing:\n{out}");
    }
    let broken = [
        (
            "ports: 5",
            good.replace(
                "    ports:\n      - \"127.0.0.1:5000:5000/udp\"\n",
                "    ports: 5\n",
            ),
        ),
        (
            "an unknown top-level key",
            format!("{good}servicez:\n  peer:\n    image: stormdht:latest\n"),
        ),
        (
            "an unknown service key",
            good.replace("    image:", "    imaeg:"),
        ),
    ];
    for (i, (what, text)) in broken.iter().enumerate() {
        assert_ne!(text, good, "{what}: the breakage changed nothing");
        let file = tmp.join(format!("broken-{i}.yml"));
        fs::write(&file, text).unwrap();
        match tools.compose_validate(std::slice::from_ref(&file)) {
            Err(out) => assert!(
                out.contains("Schema validation errors"),
                "{what}: rejected, but not by the schema:\n{out}"
            ),
            Ok(()) => panic!("check-jsonschema accepted a compose file with {what}:\n{text}"),
        }
    }
    let _ = fs::remove_dir_all(tmp);
}

#[test]
fn kustomizations_reference_only_existing_files_and_base_objects() {
    let Some(tools) = tools("kustomizations_reference_only_existing_files_and_base_objects") else {
        return;
    };
    let known: BTreeSet<&str> = [
        "apiVersion",
        "kind",
        "resources",
        "patches",
        "configMapGenerator",
        "secretGenerator",
        "generatorOptions",
        "images",
        "labels",
        "namespace",
    ]
    .into();
    for dir in kustomization_dirs() {
        let k = tools.yaml_one(&dir.join("kustomization.yaml"));
        assert_eq!(
            k["apiVersion"], "kustomize.config.k8s.io/v1beta1",
            "{dir:?}"
        );
        assert_eq!(k["kind"], "Kustomization", "{dir:?}");
        for field in k.as_object().unwrap().keys() {
            assert!(
                known.contains(field.as_str()),
                "{dir:?}: kustomization field {field:?} is unknown or deprecated here"
            );
        }
        let mut referenced = BTreeSet::from([dir.join("kustomization.yaml")]);
        for r in strings(&k["resources"], "resources") {
            let path = dir.join(&r);
            if path.is_dir() {
                assert!(
                    path.join("kustomization.yaml").is_file(),
                    "{dir:?}: {r} has no kustomization.yaml"
                );
            } else {
                assert!(path.is_file(), "{dir:?}: resource {r} does not exist");
            }
            referenced.insert(path);
        }
        for p in k["patches"].as_array().into_iter().flatten() {
            let file = p["path"]
                .as_str()
                .unwrap_or_else(|| panic!("{dir:?}: patch {p}"));
            assert!(
                dir.join(file).is_file(),
                "{dir:?}: patch {file} does not exist"
            );
            referenced.insert(dir.join(file));
        }
        for field in ["configMapGenerator", "secretGenerator"] {
            for g in k[field].as_array().into_iter().flatten() {
                for entry in strings(&g["files"], field) {
                    let file = generator_file(&entry).1;
                    assert!(
                        dir.join(&file).is_file(),
                        "{dir:?}: {field} file {file} does not exist"
                    );
                    referenced.insert(dir.join(file));
                }
            }
        }
        // Nothing lying about unused (a patch written but never listed applies nowhere).
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() && !path.ends_with("README.md") {
                assert!(
                    referenced.contains(&path),
                    "{path:?} is not referenced by {dir:?}/kustomization.yaml"
                );
            }
        }
        // Each overlay's patches target objects (and containers) its resources define:
        // render() checks that.
        let rendered = render(&tools, &dir);
        let names: BTreeSet<(String, String)> = rendered.objects.iter().map(kind_name).collect();
        assert_eq!(
            names.len(),
            rendered.objects.len(),
            "{dir:?}: an object defined twice"
        );
    }
}

/// The pod template of a workload.
fn pod(obj: &Value) -> &Value {
    &obj["spec"]["template"]["spec"]
}

/// `--config PATH` in a command line.
fn config_arg(args: &Value) -> Option<String> {
    let args: Vec<&str> = args.as_array()?.iter().filter_map(Value::as_str).collect();
    let i = args.iter().position(|a| *a == "--config" || *a == "-c")?;
    args.get(i + 1).map(|s| s.to_string())
}

fn is_stormd(container: &Value) -> bool {
    container["image"]
        .as_str()
        .is_some_and(|i| i.starts_with("stormdht:") || i.contains("/stormdht:"))
}

#[test]
fn rendered_objects_agree_with_each_other() {
    let Some(tools) = tools("rendered_objects_agree_with_each_other") else {
        return;
    };
    for dir in kustomization_dirs() {
        let r = render(&tools, &dir);
        let workloads: Vec<&Value> = r.of_kind(&["Deployment", "StatefulSet"]).collect();
        assert!(
            r.find("Deployment", "stormdht-manager").is_some(),
            "{dir:?}"
        );
        assert!(r.find("StatefulSet", "stormdht-peer").is_some(), "{dir:?}");
        for w in &workloads {
            let (kind, name) = kind_name(w);
            let at = format!("{dir:?} {kind}/{name}");
            let labels = w["spec"]["template"]["metadata"]["labels"]
                .as_object()
                .unwrap();
            for (k, v) in w["spec"]["selector"]["matchLabels"].as_object().unwrap() {
                assert_eq!(labels.get(k), Some(v), "{at}: selector {k} not on its pods");
            }
            assert!(labels.contains_key("app.kubernetes.io/name"), "{at}");
            let spec = pod(w);
            assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{at}");
            let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
            for v in &volumes {
                if let Some(cm) = v["configMap"]["name"].as_str() {
                    assert!(r.find("ConfigMap", cm).is_some(), "{at}: no ConfigMap {cm}");
                }
                if let Some(s) = v["secret"]["secretName"].as_str() {
                    assert!(r.find("Secret", s).is_some(), "{at}: no Secret {s}");
                }
            }
            for c in containers(w) {
                let at = format!("{at} container {}", c["name"]);
                let sc = &c["securityContext"];
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{at}");
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{at}");
                assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{at}");
                assert_eq!(c["imagePullPolicy"], "IfNotPresent", "{at}");
                for res in ["requests", "limits"] {
                    assert!(
                        c["resources"][res]["memory"].is_string(),
                        "{at}: no memory {res}"
                    );
                }
                assert!(
                    c["readinessProbe"].is_object() && c["livenessProbe"].is_object(),
                    "{at}"
                );
                for m in c["volumeMounts"].as_array().into_iter().flatten() {
                    assert!(
                        volumes.iter().any(|v| v["name"] == m["name"]),
                        "{at}: mounts {} which is no volume",
                        m["name"]
                    );
                    let read_only = m["readOnly"].as_bool().unwrap_or(false);
                    assert_eq!(read_only, m["mountPath"] != "/tmp", "{at}: {m}");
                }
                if !is_stormd(c) {
                    continue;
                }
                assert_eq!(sc["runAsUser"], 65534, "{at}");
                // The daemon's file and the probes' file: the same one, mounted.
                let config = config_arg(&c["args"]).unwrap_or_else(|| panic!("{at}: no --config"));
                assert!(
                    r.local_file(spec, c, &config).is_some(),
                    "{at}: {config} is not a mounted generated file"
                );
                for probe in ["readinessProbe", "livenessProbe"] {
                    assert_eq!(
                        c[probe]["exec"]["command"],
                        json!(["/stormd", "--config", config, "health"]),
                        "{at}: {probe}"
                    );
                }
                // Every file named by a variable is one that is mounted.
                for e in c["env"].as_array().into_iter().flatten() {
                    let name = e["name"].as_str().unwrap();
                    if name.ends_with("_FILE") {
                        let path = e["value"].as_str().unwrap();
                        assert!(
                            r.local_file(spec, c, path).is_some(),
                            "{at}: {name}={path} is not a mounted generated file"
                        );
                    }
                }
            }
        }
        let peers = r.find("StatefulSet", "stormdht-peer").unwrap();
        assert_eq!(peers["spec"]["podManagementPolicy"], "Parallel", "{dir:?}");
        assert_eq!(pod(peers)["terminationGracePeriodSeconds"], 60, "{dir:?}");
        let governing = peers["spec"]["serviceName"].as_str().unwrap();
        let headless = r
            .find("Service", governing)
            .unwrap_or_else(|| panic!("{dir:?}: no Service {governing}"));
        assert_eq!(
            headless["spec"]["clusterIP"], "None",
            "{dir:?}: {governing} is not headless"
        );
        let manager = r.find("Deployment", "stormdht-manager").unwrap();
        assert_eq!(manager["spec"]["replicas"], 1, "{dir:?}");
        assert_eq!(manager["spec"]["strategy"]["type"], "Recreate", "{dir:?}");
        // Each Service selects pods, and its ports reach a container port of theirs.
        for svc in r.of_kind(&["Service"]) {
            let at = format!("{dir:?} Service/{}", svc["metadata"]["name"]);
            let selector = svc["spec"]["selector"].as_object().unwrap();
            let selected: Vec<&&Value> = workloads
                .iter()
                .filter(|w| {
                    let labels = &w["spec"]["template"]["metadata"]["labels"];
                    selector.iter().all(|(k, v)| &labels[k] == v)
                })
                .collect();
            assert_eq!(
                selected.len(),
                1,
                "{at}: selects {} workloads",
                selected.len()
            );
            for port in svc["spec"]["ports"].as_array().unwrap() {
                let reached = containers(selected[0])
                    .iter()
                    .flat_map(|c| c["ports"].as_array().into_iter().flatten())
                    .any(|cp| {
                        (cp["name"] == port["targetPort"]
                            || cp["containerPort"] == port["targetPort"])
                            && cp["protocol"] == port["protocol"]
                    });
                assert!(reached, "{at}: port {port} reaches no container port");
            }
        }
    }
}

/// `stormd config` with the configuration of every stormd container of every kustomization:
/// its file, its variables (and the image's, which these override). stormd refuses unknown
/// keys and bad values, so a misspelt STORM_ variable fails here, not in the cluster.
#[test]
fn stormd_accepts_the_configuration_of_every_container() {
    let Some(tools) = tools("stormd_accepts_the_configuration_of_every_container") else {
        return;
    };
    let mut keyed = 0;
    for dir in kustomization_dirs() {
        let r = render(&tools, &dir);
        for w in r.of_kind(&["Deployment", "StatefulSet"]) {
            let spec = pod(w);
            let (kind, name) = kind_name(w);
            for c in containers(w).iter().filter(|c| is_stormd(c)) {
                let at = format!("{dir:?} {kind}/{name}");
                let config = config_arg(&c["args"]).unwrap();
                let local = r.local_file(spec, c, &config).unwrap();
                // The image's ENV (deploy/Dockerfile), then the container's.
                let mut env: BTreeMap<String, String> = BTreeMap::from([
                    ("STORM_LISTEN".into(), "0.0.0.0:5000".into()),
                    ("STORM_DATA".into(), "/data/sample-details.csv".into()),
                ]);
                for e in c["env"].as_array().into_iter().flatten() {
                    let var = e["name"].as_str().unwrap().to_string();
                    let value = if let Some(v) = e["value"].as_str() {
                        match r.local_file(spec, c, v) {
                            Some(file) => file.to_string_lossy().into_owned(),
                            None => v.to_string(),
                        }
                    } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                        format!("{name}-0")
                    } else {
                        panic!("{at}: {var}: a value this test cannot stand in for: {e}")
                    };
                    env.insert(var, value);
                }
                let out = run(Command::new(STORMD)
                    .env_clear()
                    .envs(&env)
                    .arg("--config")
                    .arg(&local)
                    .arg("config"));
                assert!(
                    out.status.success(),
                    "{}",
                    show(&format!("{at}: stormd config ({env:?})"), &out)
                );
                let effective: toml::Value =
                    toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
                let role = effective["role"].as_str().unwrap();
                assert_eq!(
                    role,
                    if kind == "StatefulSet" {
                        "peer"
                    } else {
                        "manager"
                    },
                    "{at}"
                );
                let port = effective["listen"]
                    .as_str()
                    .unwrap()
                    .rsplit_once(':')
                    .unwrap()
                    .1
                    .parse::<u64>()
                    .unwrap();
                assert!(
                    c["ports"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|p| p["containerPort"] == port && p["protocol"] == "UDP"),
                    "{at}: stormd listens on {port}, which is not a UDP container port"
                );
                if role == "peer" {
                    let manager = effective["manager"].as_str().unwrap();
                    let (host, port) = manager.rsplit_once(':').unwrap();
                    let port: u64 = port.parse().unwrap();
                    let svc = r.find("Service", host).unwrap_or_else(|| {
                        panic!("{at}: manager = {manager:?}: no Service {host}")
                    });
                    assert!(
                        svc["spec"]["ports"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|p| p["port"] == port && p["protocol"] == "UDP"),
                        "{at}: manager = {manager:?}: Service {host} has no UDP port {port}"
                    );
                    assert_eq!(
                        effective["name"].as_str(),
                        Some(format!("{name}-0").as_str()),
                        "{at}"
                    );
                }
                if let Some(file) = env.get("STORM_CLUSTER_KEY_FILE") {
                    // The keyring is read when the daemon starts or probes: a probe of nothing
                    // (port 1) gets as far as "no answer" only with a keyring stormd accepts.
                    keyed += 1;
                    let out = run(Command::new(STORMD)
                        .env_clear()
                        .envs(&env)
                        .env("STORM_LISTEN", "127.0.0.1:1")
                        .arg("--config")
                        .arg(&local)
                        .args(["health", "--timeout-ms", "200"]));
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    assert!(
                        out.status.code() == Some(1) && stderr.contains("no answer"),
                        "{}",
                        show(
                            &format!("{at}: stormd health with the keyring {file}"),
                            &out
                        )
                    );
                    assert_eq!(
                        env.get("STORMCTL_KEY_FILE"),
                        Some(file),
                        "{at}: stormctl in the pod needs the key too"
                    );
                }
            }
        }
    }
    assert!(
        keyed >= 2,
        "no overlay gives manager and peers a cluster key file"
    );
}

/// With kubectl installed, its kustomize must render every kustomization into objects that
/// validate and that agree with render() (names compared before kustomize's hash suffix).
#[test]
fn kubectl_kustomize_output_validates_and_agrees() {
    let Some(tools) = tools("kubectl_kustomize_output_validates_and_agrees") else {
        return;
    };
    let has_kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_kubectl {
        eprintln!(
            "\n*** SKIPPED kubectl_kustomize_output_validates_and_agrees: kubectl is not \
             installed (the other tests render the kustomizations themselves). ***\n"
        );
        return;
    }
    let tmp = scratch("kubectl");
    for dir in kustomization_dirs() {
        let out = run(Command::new("kubectl").arg("kustomize").arg(&dir));
        assert!(
            out.status.success(),
            "{}",
            show(&format!("kubectl kustomize {dir:?}"), &out)
        );
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let file = tmp.join(format!("{name}.yaml"));
        fs::write(&file, &out.stdout).unwrap();
        let theirs = tools.yaml(&file);
        if let Err(out) = tools.k8s_validate(std::slice::from_ref(&file)) {
            panic!("kubectl kustomize {dir:?} output is rejected:\n{out}");
        }
        let ours = render(&tools, &dir);
        // Generated names carry a hash: map them back, everywhere they are referred to.
        let mut text = serde_json::to_string(&theirs).unwrap();
        for (kind, generated) in ours.generated.keys() {
            let hashed = theirs
                .iter()
                .map(kind_name)
                .find(|(k, n)| {
                    k == kind
                        && n.strip_prefix(&format!("{generated}-"))
                            .is_some_and(|h| h.len() == 10)
                })
                .unwrap_or_else(|| panic!("{dir:?}: kubectl made no {kind} {generated}-<hash>"))
                .1;
            text = text.replace(&format!("\"{hashed}\""), &format!("\"{generated}\""));
        }
        let theirs: Vec<Value> = serde_json::from_str(&text).unwrap();
        let by_name = |objs: &[Value]| -> BTreeMap<(String, String), Value> {
            objs.iter().map(|o| (kind_name(o), o.clone())).collect()
        };
        let (theirs, ours) = (by_name(&theirs), by_name(&ours.objects));
        assert_eq!(
            theirs.keys().collect::<Vec<_>>(),
            ours.keys().collect::<Vec<_>>(),
            "{dir:?}: objects"
        );
        for (key, obj) in &ours {
            if key.0 == "ConfigMap" || key.0 == "Secret" {
                continue; // the data is compared through the files above; encodings differ
            }
            assert_eq!(
                &theirs[key], obj,
                "{dir:?}: {key:?} differs between kubectl kustomize and render()"
            );
        }
    }
    let _ = fs::remove_dir_all(tmp);
}
