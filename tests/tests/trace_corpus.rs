//! The trace corpus: every `tests/trace/*.yaml` file, run through the real `sluice trace`
//! binary. The format is described in `tests/trace/README.md`; in short, a file gives manifests
//! and cases, and a case a packet, flags and the expected outcome, of which only the fields
//! given are compared.
//!
//! Needs root (the trace loads BPF programs and runs them with BPF_PROG_RUN): without it the
//! cases fail, they never skip. Nothing here touches an interface or a pinned map.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml::Value as Yaml;
use sluice_testbed::{sluice::sluice_bin, unique_name};

/// One corpus file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CorpusFile {
    /// What the file is about (documentation only).
    #[allow(dead_code)]
    description: Option<String>,
    /// Directories (relative to the repository root) whose manifest files are copied into the
    /// file's manifests directory.
    #[serde(default)]
    manifest_dirs: Vec<PathBuf>,
    /// Manifest files written into the manifests directory: file name -> content.
    #[serde(default)]
    manifests: BTreeMap<String, String>,
    /// Arguments every case gets (before its own).
    #[serde(default)]
    args: Vec<String>,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    /// The packet argument; `packets` runs the case once per packet instead.
    packet: Option<String>,
    #[serde(default)]
    packets: Vec<String>,
    /// `--all`.
    #[serde(default)]
    all: bool,
    /// `--from`.
    from: Option<String>,
    /// More arguments.
    #[serde(default)]
    args: Vec<String>,
    /// Whether the file's `args` come first (`false`: this case without them).
    #[serde(default = "yes")]
    inherit_args: bool,
    /// Human output instead of `--json`.
    #[serde(default)]
    human: bool,
    /// `--manifests` points here (relative to the file's manifests directory) instead.
    manifests_path: Option<String>,
    /// No `--manifests` argument at all.
    #[serde(default)]
    omit_manifests: bool,
    /// Expected outcome: only the keys given are checked (see README.md).
    #[serde(default)]
    expect: BTreeMap<String, Yaml>,
}

fn yes() -> bool {
    true
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(unique_name("sluicetb-trace"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// The keys an `expect:` map may hold.
const EXPECT_KEYS: &[&str] = &[
    "exit",
    "stderr",
    "stdout",
    "verdict",
    "backend",
    "backend_in",
    "backends",
    "masquerade",
    "snat_ip",
    "reason",
    "packet",
    "from",
    "programs",
    "service",
    "reply_seen_as",
    "reply_from_original_destination",
    "warnings",
];

/// Keys read from the JSON output (the others are about the process).
const JSON_KEYS: &[&str] = &[
    "verdict",
    "backend",
    "backend_in",
    "backends",
    "masquerade",
    "snat_ip",
    "reason",
    "packet",
    "from",
    "programs",
    "service",
    "reply_seen_as",
    "reply_from_original_destination",
    "warnings",
];

#[test]
fn trace_corpus() {
    let corpus_dir = repo_root().join("tests/trace");
    let mut files: Vec<PathBuf> = fs::read_dir(&corpus_dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", corpus_dir.display()))
        .map(|entry| entry.expect("listing the corpus").path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no corpus files in {}",
        corpus_dir.display()
    );

    let bin = sluice_bin();
    // Files run side by side (each trace is a process that loads the programs: under the
    // kernel matrix's emulated CPUs that is seconds, and the CPUs are otherwise idle).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(usize, Vec<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(file) = files.get(i) else {
                            return done;
                        };
                        done.push(run_file(&bin, file));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a corpus worker panicked"))
            .collect()
    });
    let runs: usize = results.iter().map(|(runs, _)| runs).sum();
    let failures: Vec<String> = results.into_iter().flat_map(|(_, f)| f).collect();
    eprintln!("trace corpus: {runs} traces from {} files", files.len());
    assert!(
        failures.is_empty(),
        "{} of {runs} corpus traces failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Runs one corpus file's cases: how many traces ran, and the failures.
fn run_file(bin: &Path, file: &Path) -> (usize, Vec<String>) {
    let name = file
        .strip_prefix(repo_root())
        .unwrap_or(file)
        .display()
        .to_string();
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {name}: {e}"));
    let corpus: CorpusFile =
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{name}: bad corpus file: {e}"));
    assert!(!corpus.cases.is_empty(), "{name}: no cases");
    let manifests = TempDir::new();
    write_manifests(&corpus, &manifests.0, &name);
    let (mut runs, mut failures) = (0, Vec::new());
    for case in &corpus.cases {
        check_case_format(case, &name);
        let packets: Vec<Option<&str>> = if case.packets.is_empty() {
            vec![case.packet.as_deref()]
        } else {
            case.packets.iter().map(|p| Some(p.as_str())).collect()
        };
        for packet in packets {
            runs += 1;
            if let Err(failure) = run_case(bin, &corpus, case, packet, &manifests.0) {
                failures.push(format!("{name}: {}: {failure}", case.name));
            }
        }
    }
    (runs, failures)
}

fn write_manifests(corpus: &CorpusFile, dir: &Path, name: &str) {
    for source in &corpus.manifest_dirs {
        let source = repo_root().join(source);
        let entries = fs::read_dir(&source)
            .unwrap_or_else(|e| panic!("{name}: manifest_dirs {}: {e}", source.display()));
        for entry in entries {
            let path = entry.expect("listing manifests").path();
            if path.is_file() {
                let target = dir.join(path.file_name().expect("a file name"));
                assert!(
                    !target.exists(),
                    "{name}: two manifest files named {}",
                    target.display()
                );
                fs::copy(&path, &target).expect("copying a manifest");
            }
        }
    }
    for (file, content) in &corpus.manifests {
        let target = dir.join(file);
        assert!(
            !target.exists(),
            "{name}: manifest {file} is also in a manifest_dirs directory"
        );
        fs::write(&target, content).expect("writing a manifest");
    }
}

/// A malformed case is a bug in the corpus: fail at once, loudly.
fn check_case_format(case: &Case, file: &str) {
    let at = format!("{file}: {}", case.name);
    assert!(
        case.packet.is_none() || case.packets.is_empty(),
        "{at}: give `packet` or `packets`, not both"
    );
    for key in case.expect.keys() {
        assert!(
            EXPECT_KEYS.contains(&key.as_str()),
            "{at}: unknown expect key {key:?} (known: {EXPECT_KEYS:?})"
        );
    }
    let exit = expected_exit(case);
    let json_keys: Vec<&String> = case
        .expect
        .keys()
        .filter(|k| JSON_KEYS.contains(&k.as_str()))
        .collect();
    assert!(
        json_keys.is_empty() || (exit == 0 && !case.human),
        "{at}: {json_keys:?} are read from the JSON output: they need exit 0 and no `human`"
    );
    assert!(
        !case.expect.is_empty(),
        "{at}: a case without expectations checks nothing"
    );
}

fn expected_exit(case: &Case) -> i64 {
    case.expect
        .get("exit")
        .map(|v| v.as_i64().expect("exit: a number"))
        .unwrap_or(0)
}

fn run_case(
    bin: &Path,
    corpus: &CorpusFile,
    case: &Case,
    packet: Option<&str>,
    manifests: &Path,
) -> Result<(), String> {
    let mut command = Command::new(bin);
    command.arg("trace");
    if !case.omit_manifests {
        let path = match &case.manifests_path {
            Some(relative) => manifests.join(relative),
            None => manifests.to_path_buf(),
        };
        command.arg("--manifests").arg(path);
    }
    if case.inherit_args {
        command.args(&corpus.args);
    }
    command.args(&case.args);
    if !case.human {
        command.arg("--json");
    }
    if case.all {
        command.arg("--all");
    }
    if let Some(from) = &case.from {
        command.args(["--from", from]);
    }
    if let Some(packet) = packet {
        command.arg(packet);
    }
    // A NODE_NAME in the test's environment would change the node context.
    command.env_remove("NODE_NAME");
    let output = command
        .output()
        .map_err(|e| format!("running {}: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = || {
        format!(
            "\n  command: {command:?}\n  exit: {:?}\n  stdout: {}\n  stderr: {}",
            output.status.code(),
            stdout.trim_end().replace('\n', "\n          "),
            stderr.trim_end().replace('\n', "\n          ")
        )
    };

    let mut problems = Vec::new();
    let exit = i64::from(output.status.code().unwrap_or(-1));
    if exit != expected_exit(case) {
        problems.push(format!(
            "exit code {exit}, expected {}",
            expected_exit(case)
        ));
    }
    for (key, text) in [("stderr", &stderr), ("stdout", &stdout)] {
        if let Some(wanted) = case.expect.get(key) {
            for needle in strings(wanted, key) {
                if !text.contains(&needle) {
                    problems.push(format!("{key} lacks {needle:?}"));
                }
            }
        }
    }
    if exit == 0 && !case.human && problems.is_empty() {
        match serde_json::from_str::<Json>(&stdout) {
            Ok(report) => check_report(case, &report, &mut problems),
            Err(e) => problems.push(format!("stdout is not one JSON object: {e}")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        let mut message = problems.join("; ");
        let _ = write!(message, "{}", context());
        Err(message)
    }
}

/// A string or a list of strings.
fn strings(value: &Yaml, key: &str) -> Vec<String> {
    match value {
        Yaml::String(s) => vec![s.clone()],
        Yaml::Sequence(items) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .unwrap_or_else(|| panic!("{key}: strings only"))
                    .to_owned()
            })
            .collect(),
        other => panic!("{key}: a string or a list of strings, not {other:?}"),
    }
}

/// A YAML scalar as the JSON value the report would hold.
fn as_json(value: &Yaml) -> Json {
    serde_json::to_value(value).expect("YAML scalars convert to JSON")
}

fn check_report(case: &Case, report: &Json, problems: &mut Vec<String>) {
    let field = |name: &str| report.get(name).cloned().unwrap_or(Json::Null);
    // A datapath that leaves broken packets says so in `warnings`: no case accepts that silently.
    if !case.expect.contains_key("warnings") {
        expect_equal(problems, "warnings", field("warnings"), Json::Array(vec![]));
    }
    for (key, wanted) in &case.expect {
        match key.as_str() {
            "exit" | "stderr" | "stdout" => {}
            "verdict" | "backend" | "masquerade" | "snat_ip" | "packet" | "from" | "programs"
            | "warnings" => expect_equal(problems, key, field(key), as_json(wanted)),
            "reason" => match wanted {
                Yaml::Null => expect_equal(problems, key, field(key), Json::Null),
                _ => {
                    let needle = wanted.as_str().expect("reason: a string or null");
                    match field(key).as_str() {
                        Some(reason) if reason.contains(needle) => {}
                        _ => problems.push(format!(
                            "reason is {}, expected to contain {needle:?}",
                            field(key)
                        )),
                    }
                }
            },
            "backend_in" => {
                let allowed: BTreeSet<String> = strings(wanted, key).into_iter().collect();
                match field("backend").as_str() {
                    Some(backend) if allowed.contains(backend) => {}
                    other => problems.push(format!("backend {other:?} is not one of {allowed:?}")),
                }
            }
            "backends" => {
                let actual = field("backends");
                if wanted.is_null() {
                    expect_equal(problems, key, actual, Json::Null);
                    continue;
                }
                let wanted: BTreeSet<String> = strings(wanted, key).into_iter().collect();
                let actual_set: Option<BTreeSet<String>> = actual.as_array().map(|items| {
                    items
                        .iter()
                        .map(|i| i.as_str().unwrap_or_default().to_owned())
                        .collect()
                });
                if actual_set.as_ref() != Some(&wanted) {
                    problems.push(format!(
                        "backends are {actual}, expected exactly {wanted:?}"
                    ));
                }
            }
            "service" => {
                let actual = field("service").get("name").cloned().unwrap_or(Json::Null);
                expect_equal(problems, "service name", actual, as_json(wanted));
            }
            "reply_seen_as" => {
                let actual = field("reply").get("seen_as").cloned().unwrap_or(Json::Null);
                expect_equal(problems, key, actual, as_json(wanted));
            }
            "reply_from_original_destination" => {
                let actual = field("reply")
                    .get("from_original_destination")
                    .cloned()
                    .unwrap_or(Json::Null);
                expect_equal(problems, key, actual, as_json(wanted));
            }
            other => unreachable!("check_case_format lets only known keys through: {other}"),
        }
    }
}

fn expect_equal(problems: &mut Vec<String>, key: &str, actual: Json, wanted: Json) {
    if actual != wanted {
        problems.push(format!("{key} is {actual}, expected {wanted}"));
    }
}
