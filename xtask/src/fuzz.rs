//! `cargo xtask fuzz [TARGET...] [--seconds N]`: builds the cargo-fuzz targets of `fuzz/`
//! (libFuzzer, nightly toolchain) and runs each for a bounded time with a bounded input size.
//! A crash (a panic, a failed invariant, a timeout) fails the command naming the input libFuzzer
//! saved and the command that replays it.
//!
//! The corpora live in `fuzz/corpus/TARGET` (not committed; they grow from run to run; the
//! test suite's short runs start from the seeds alone instead, see [`Corpus`]). Each run
//! first writes the seeds there, taken from the repository so no file is duplicated: the
//! manifests of `examples/` and of the `sluice trace` corpus (`tests/trace/*.yaml`, each
//! file's manifests as one multi-document file) for the targets that read manifests, and the
//! trace corpus' packets for the packet-spec parser. Logs go to `fuzz/target/logs/TARGET.log`.
//!
//! The targets are built without a sanitizer (Sluice is safe Rust: libFuzzer's coverage and a
//! panic are what find its bugs) and with debug assertions (overflow checks). The agent's
//! build script builds the eBPF programs in a cargo of its own with its own flags (aya-build
//! sets CARGO_ENCODED_RUSTFLAGS, which cargo prefers to the RUSTFLAGS cargo-fuzz sets), so
//! libFuzzer's instrumentation never reaches them: the programs are the ones `cargo build`
//! makes (the same instructions), and every build checks that the object calls no coverage
//! hook.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context as _};

use crate::{has_command, run, workspace_root};

/// The cargo-fuzz release `cargo xtask setup` installs (it builds with the stable toolchain).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Seconds each target runs in `cargo xtask test` (SLUICE_FUZZ_SECONDS overrides it).
pub const SUITE_SECONDS: u64 = 60;

/// A libFuzzer input that takes longer than this (seconds) is reported as a hang.
const TIMEOUT_SECONDS: u64 = 30;

/// What a target's seeds are made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seeds {
    /// Manifest files: examples/ and the trace corpus' manifests.
    Manifests,
    /// `sluice trace` packet specs.
    Packets,
}

pub struct Target {
    pub name: &'static str,
    /// libFuzzer's `-max_len`: the largest input it makes.
    pub max_len: usize,
    pub seeds: Seeds,
}

impl Seeds {
    /// The libFuzzer dictionary (in fuzz/) for inputs of this kind.
    pub fn dictionary(self) -> Option<&'static str> {
        match self {
            Seeds::Manifests => Some("manifests.dict"),
            Seeds::Packets => None,
        }
    }
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "manifests",
        max_len: 32 * 1024,
        seeds: Seeds::Manifests,
    },
    Target {
        name: "translate",
        max_len: 32 * 1024,
        seeds: Seeds::Manifests,
    },
    Target {
        name: "policy",
        max_len: 32 * 1024,
        seeds: Seeds::Manifests,
    },
    Target {
        name: "trace_spec",
        max_len: 256,
        seeds: Seeds::Packets,
    },
];

/// The cargo-fuzz options every build and run uses: no sanitizer, debug assertions on, and
/// cargo's usual 16 codegen units (cargo-fuzz's default of one makes the runs about 8% faster
/// and the builds twice as slow: 13 minutes from scratch, 4 after a change to the agent, on
/// two CPUs).
const FUZZ_OPTIONS: &[&str] = &[
    "--sanitizer",
    "none",
    "--debug-assertions",
    "--codegen-units",
    "16",
];

/// Where a run's corpus lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Corpus {
    /// `fuzz/corpus/TARGET`, kept from run to run: each run starts from everything earlier
    /// runs found (and first replays all of it, which takes longer as it grows).
    Kept,
    /// The seeds alone, in a directory emptied first (`fuzz/target/suite-corpus/TARGET`): the
    /// test suite's runs take the same time on every machine, as on a fresh clone.
    Fresh,
}

/// Builds and runs `names` (all targets when empty) for `seconds` each, two at a time on a
/// machine with two CPUs or more.
pub fn run_targets(names: &[String], seconds: u64, corpus: Corpus) -> anyhow::Result<()> {
    let targets = crate::choose(TARGETS, names, |t| t.name, "fuzz target")?;
    if !has_command("cargo-fuzz") {
        bail!(
            "cargo-fuzz is not installed: run `cargo xtask setup` (or `cargo install \
             cargo-fuzz@{CARGO_FUZZ_VERSION} --locked`)"
        );
    }
    let root = workspace_root();
    let started = Instant::now();
    let mut build = cargo_fuzz(&root, "build");
    // cargo fuzz builds one target or all of them.
    if let [target] = targets.as_slice() {
        build.arg(target.name);
    }
    run(&mut build).context("building the fuzz targets")?;
    ebpf_is_not_instrumented(&root)?;
    let built = started.elapsed();
    eprintln!("fuzz: targets built in {:.0?}", built);

    let logs = root.join("fuzz/target/logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let parallel = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 2);
    let mut failures = Vec::new();
    for batch in targets.chunks(parallel) {
        let mut running = Vec::new();
        for target in batch {
            let corpus = match corpus {
                Corpus::Kept => root.join("fuzz/corpus").join(target.name),
                Corpus::Fresh => {
                    let dir = root.join("fuzz/target/suite-corpus").join(target.name);
                    if dir.exists() {
                        fs::remove_dir_all(&dir)
                            .with_context(|| format!("removing {}", dir.display()))?;
                    }
                    dir
                }
            };
            let seeds = write_seeds(&root, target.seeds, &corpus)?;
            eprintln!(
                "fuzz: {} for {seconds} s ({seeds} seeds, inputs up to {} bytes)",
                target.name, target.max_len
            );
            running.push(start(&root, target, &corpus, seconds, &logs)?);
        }
        for run in running {
            if let Err(e) = run.finish() {
                failures.push(format!("{e:#}"));
            }
        }
    }
    eprintln!(
        "fuzz: {} target(s), {} s each, done in {:.0?} (build {:.0?})",
        targets.len(),
        seconds,
        started.elapsed(),
        built
    );
    if !failures.is_empty() {
        bail!("fuzzing found problems:\n{}", failures.join("\n"));
    }
    Ok(())
}

fn cargo_fuzz(root: &Path, what: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(["+nightly", "fuzz", what, "--fuzz-dir", "fuzz"])
        .args(FUZZ_OPTIONS);
    // What `cargo run` sets for xtask itself: ring's build script watches CARGO_MANIFEST_DIR,
    // so with xtask's value the build would not be the one `cargo fuzz` run by hand makes,
    // and each would rebuild the agent's dependencies (minutes).
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key == "CARGO"
            || key == "CARGO_PRIMARY_PACKAGE"
            || [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|prefix| key.starts_with(prefix))
        {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

/// The eBPF object the fuzz build's agent embeds must be built without libFuzzer's flags: a
/// coverage hook in it would be a call the verifier rejects (and would mean the programs the
/// targets see are not the real ones).
fn ebpf_is_not_instrumented(root: &Path) -> anyhow::Result<()> {
    let build = root.join("fuzz/target/x86_64-unknown-linux-gnu/release/build");
    let objects: Vec<PathBuf> = fs::read_dir(&build)
        .with_context(|| format!("reading {}", build.display()))?
        .filter_map(|e| e.ok().map(|e| e.path().join("out/sluice-ebpf")))
        .filter(|p| p.is_file())
        .collect();
    if objects.is_empty() {
        bail!(
            "the fuzz build left no eBPF object under {}",
            build.display()
        );
    }
    for object in objects {
        let bytes = fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
        for hook in [&b"__sanitizer_cov"[..], b"__sancov"] {
            if bytes.windows(hook.len()).any(|w| w == hook) {
                bail!(
                    "{} was built with libFuzzer's instrumentation ({}): the fuzz flags reached \
                     the eBPF build",
                    object.display(),
                    String::from_utf8_lossy(hook)
                );
            }
        }
    }
    Ok(())
}

/// A target being fuzzed.
struct Running {
    name: &'static str,
    child: std::process::Child,
    log: PathBuf,
    artifacts: PathBuf,
    before: BTreeSet<PathBuf>,
    reader: std::thread::JoinHandle<std::io::Result<Vec<String>>>,
}

fn start(
    root: &Path,
    target: &Target,
    corpus: &Path,
    seconds: u64,
    logs: &Path,
) -> anyhow::Result<Running> {
    let artifacts = root.join("fuzz/artifacts").join(target.name);
    fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    let before = files(&artifacts);
    let log = logs.join(format!("{}.log", target.name));
    let mut cmd = cargo_fuzz(root, "run");
    cmd.arg(target.name)
        .arg(corpus)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-max_len={}", target.max_len))
        .arg(format!("-timeout={TIMEOUT_SECONDS}"))
        .args(
            target
                .seeds
                .dictionary()
                .map(|d| format!("-dict={}", root.join("fuzz").join(d).display())),
        )
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {cmd:?}"))?;
    // libFuzzer reports on stderr, the target's own output (none) on stdout: both to the log.
    let stderr = child.stderr.take().expect("piped");
    let stdout = child.stdout.take().expect("piped");
    let mut file = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let reader = std::thread::spawn(move || {
        let out = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .collect::<std::io::Result<Vec<String>>>()
        });
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let line = line?;
            writeln!(file, "{line}")?;
            lines.push(line);
        }
        for line in out.join().expect("stdout reader")? {
            writeln!(file, "{line}")?;
        }
        Ok(lines)
    });
    Ok(Running {
        name: target.name,
        child,
        log,
        artifacts,
        before,
        reader,
    })
}

impl Running {
    fn finish(mut self) -> anyhow::Result<()> {
        let status = self.child.wait().context("waiting for cargo fuzz")?;
        let lines = self
            .reader
            .join()
            .expect("log reader")
            .with_context(|| format!("writing {}", self.log.display()))?;
        let stat = |name: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                .map(|v| v.trim().to_string())
                .unwrap_or_else(|| "?".into())
        };
        let corpus = lines
            .iter()
            .rev()
            .find_map(|l| l.split_once(" corp: ").map(|(_, c)| c))
            .and_then(|c| c.split_whitespace().next())
            .unwrap_or("?");
        let new: Vec<PathBuf> = files(&self.artifacts)
            .difference(&self.before)
            .cloned()
            .collect();
        if status.success() && new.is_empty() {
            eprintln!(
                "fuzz: {}: {} runs ({} per second), corpus {corpus} inputs, no crash (log {})",
                self.name,
                stat("number_of_executed_units"),
                stat("average_exec_per_sec"),
                self.log.display()
            );
            return Ok(());
        }
        // The end of libFuzzer's report (the panic message, where the input went), without
        // its progress lines and the stack's frames (the log has them).
        let report: Vec<&String> = lines
            .iter()
            .filter(|l| !l.starts_with('#') && !is_stack_frame(l))
            .collect();
        for line in &report[report.len().saturating_sub(40)..] {
            eprintln!("  {}: {line}", self.name);
        }
        let replay = |artifact: &Path| {
            format!(
                "cargo +nightly fuzz run --fuzz-dir fuzz {} {} {}",
                FUZZ_OPTIONS.join(" "),
                self.name,
                artifact.display()
            )
        };
        if new.is_empty() {
            bail!(
                "fuzz target {} failed ({status}) without saving an input; log: {}",
                self.name,
                self.log.display()
            );
        }
        let found: Vec<String> = new
            .iter()
            .map(|a| format!("  {}\n    replay: {}", a.display(), replay(a)))
            .collect();
        bail!(
            "fuzz target {} crashed ({status}); the input is saved:\n{}\n  log: {}",
            self.name,
            found.join("\n"),
            self.log.display()
        )
    }
}

/// `  12: function` or `             at file:line` of a Rust backtrace.
fn is_stack_frame(line: &str) -> bool {
    let trimmed = line.trim_start();
    trimmed.starts_with("at ")
        || trimmed
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn files(dir: &Path) -> BTreeSet<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

/// Writes the seeds of `kind` into `corpus` as `seed-*` files (replacing earlier seeds);
/// returns how many.
fn write_seeds(root: &Path, kind: Seeds, corpus: &Path) -> anyhow::Result<usize> {
    fs::create_dir_all(corpus).with_context(|| format!("creating {}", corpus.display()))?;
    for old in files(corpus) {
        if old
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seed-"))
        {
            fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    let seeds = seeds(root, kind)?;
    for (name, content) in &seeds {
        let path = corpus.join(format!("seed-{name}"));
        fs::write(&path, content).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(seeds.len())
}

/// (name, content) of every seed of `kind`, from examples/ and tests/trace/.
pub fn seeds(root: &Path, kind: Seeds) -> anyhow::Result<Vec<(String, String)>> {
    let mut seeds = Vec::new();
    let traces = sorted_files(&root.join("tests/trace"), "yaml")?;
    match kind {
        Seeds::Manifests => {
            let examples = root.join("examples/ecommerce");
            let mut all = Vec::new();
            for file in sorted_files(&examples, "yaml")? {
                let text = read(&file)?;
                seeds.push((format!("examples-{}", file_name(&file)), text.clone()));
                all.push(text);
            }
            seeds.push(("examples-all.yaml".into(), all.join("\n---\n")));
            for file in traces {
                let text = read(&file)?;
                let mut documents: Vec<String> = Vec::new();
                for dir in manifest_dirs(&text) {
                    for manifest in sorted_files(&root.join(&dir), "yaml")? {
                        documents.push(read(&manifest)?);
                    }
                }
                documents.extend(trace_manifests(&text).into_iter().map(|(_, m)| m));
                if !documents.is_empty() {
                    seeds.push((
                        format!("trace-{}", file_name(&file)),
                        documents.join("\n---\n"),
                    ));
                }
            }
        }
        Seeds::Packets => {
            let mut packets = BTreeSet::new();
            for file in traces {
                packets.extend(trace_packets(&read(&file)?));
            }
            for (i, packet) in packets.into_iter().enumerate() {
                seeds.push((format!("packet-{i}"), packet));
            }
        }
    }
    Ok(seeds)
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn sorted_files(dir: &Path, extension: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == extension) && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// The trace corpus' format (tests/trace/README.md) read line by line: the seeds need no YAML
/// parser (this crate builds before anything else and keeps its dependencies few), and a seed
/// only has to be a good start.
///
/// `manifest_dirs: [a, b]`.
fn manifest_dirs(text: &str) -> Vec<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("manifest_dirs:"))
        .map(|list| list_items(list.trim()))
        .unwrap_or_default()
}

/// The files of the top-level `manifests:` map: `  NAME: |` and the block below it, indented.
fn trace_manifests(text: &str) -> Vec<(String, String)> {
    let mut manifests: Vec<(String, String)> = Vec::new();
    let mut in_manifests = false;
    let mut current: Option<(String, Vec<&str>)> = None;
    let mut flush = |current: &mut Option<(String, Vec<&str>)>| {
        if let Some((name, lines)) = current.take() {
            let mut content = lines.join("\n");
            content.push('\n');
            manifests.push((name, content));
        }
    };
    for line in text.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            flush(&mut current);
            in_manifests = line.trim_end() == "manifests:";
            continue;
        }
        if !in_manifests {
            continue;
        }
        if let Some(header) = line.strip_prefix("  ").filter(|l| !l.starts_with(' ')) {
            flush(&mut current);
            if let Some((name, style)) = header.split_once(':') {
                if style.trim().starts_with('|') {
                    current = Some((name.trim().to_string(), Vec::new()));
                }
            }
            continue;
        }
        if let Some((_, lines)) = &mut current {
            lines.push(line.strip_prefix("    ").unwrap_or(line.trim_start()));
        }
    }
    flush(&mut current);
    manifests
}

/// Every packet spec the cases name: `packet: SPEC` (also in `expect`, the packet as it
/// leaves), `packets: [A, B]` and `packets:` followed by `- SPEC` items.
fn trace_packets(text: &str) -> Vec<String> {
    let mut packets = Vec::new();
    let mut list_indent: Option<usize> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(list) = list_indent {
            match trimmed.strip_prefix("- ") {
                Some(item) if indent >= list => {
                    packets.push(scalar(item));
                    continue;
                }
                _ => list_indent = None,
            }
        }
        let trimmed = trimmed.strip_prefix("- ").unwrap_or(trimmed);
        if let Some(value) = trimmed.strip_prefix("packet:") {
            let value = scalar(value);
            if !value.is_empty() && value != "null" {
                packets.push(value);
            }
        } else if let Some(value) = trimmed.strip_prefix("packets:") {
            let value = strip_comment(value).trim();
            if value.is_empty() {
                list_indent = Some(indent);
            } else {
                packets.extend(list_items(value));
            }
        }
    }
    packets
}

/// A plain or double-quoted YAML scalar on one line, without a trailing comment.
fn scalar(value: &str) -> String {
    let value = strip_comment(value).trim();
    value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value)
        .to_string()
}

/// `text` without a ` # comment` outside double quotes.
fn strip_comment(text: &str) -> &str {
    let mut quoted = false;
    let mut previous = ' ';
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted && previous.is_whitespace() => return &text[..i],
            _ => {}
        }
        previous = c;
    }
    text
}

/// The items of a one-line YAML flow list `[a, "b, c", d]`.
fn list_items(list: &str) -> Vec<String> {
    let inner = strip_comment(list)
        .trim()
        .strip_prefix('[')
        .and_then(|l| l.strip_suffix(']'))
        .unwrap_or_default();
    let mut items = Vec::new();
    let mut item = String::new();
    let mut quoted = false;
    for c in inner.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                item.push(c);
            }
            ',' if !quoted => items.push(scalar(&std::mem::take(&mut item))),
            _ => item.push(c),
        }
    }
    if !item.trim().is_empty() {
        items.push(scalar(&item));
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    const CASE_FILE: &str = r#"# Format: tests/trace/README.md
description: >
  something
manifest_dirs: [examples/ecommerce]
manifests:
  nodes.yaml: |
    apiVersion: v1
    kind: Node
    metadata: {name: node-a}

    # a comment
  web.yaml: |
    apiVersion: v1
    kind: Service
args: [--cluster-cidr, 10.244.0.0/16]
cases:
- name: one
  packet: tcp 10.244.0.5 -> 10.96.0.1:8080     # the PACKET argument
  expect:
    packet: "tcp [fd00::5]:40000 -> [fd00::1]:80"
- name: two
  packets:
  - "tcp"
  - tcp 10.244.1.5 -> [fd00:10:96::7:1]:80
  expect: {verdict: DROP}
- name: three
  packets: ["tcp [fd00::62]:40000 -> [fd00::61]:80", udp 10.0.0.1 -> 10.0.0.2:53]
  expect:
    packet: null
"#;

    #[test]
    fn seeds_come_out_of_a_trace_case_file() {
        assert_eq!(manifest_dirs(CASE_FILE), ["examples/ecommerce"]);
        let manifests = trace_manifests(CASE_FILE);
        assert_eq!(
            manifests,
            [
                (
                    "nodes.yaml".to_string(),
                    "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n\n# a comment\n"
                        .to_string()
                ),
                (
                    "web.yaml".to_string(),
                    "apiVersion: v1\nkind: Service\n".to_string()
                ),
            ]
        );
        assert_eq!(
            trace_packets(CASE_FILE),
            [
                "tcp 10.244.0.5 -> 10.96.0.1:8080",
                "tcp [fd00::5]:40000 -> [fd00::1]:80",
                "tcp",
                "tcp 10.244.1.5 -> [fd00:10:96::7:1]:80",
                "tcp [fd00::62]:40000 -> [fd00::61]:80",
                "udp 10.0.0.1 -> 10.0.0.2:53",
            ]
        );
    }

    /// The repository's own files give seeds for every target: a manifests seed per example
    /// file and per trace case file with manifests, and the trace corpus' packets.
    #[test]
    fn the_repository_gives_seeds() {
        let root = workspace_root();
        let manifests = seeds(&root, Seeds::Manifests).unwrap();
        assert!(
            manifests.len() >= 10,
            "{:?}",
            manifests.iter().map(|s| &s.0).collect::<Vec<_>>()
        );
        assert!(manifests
            .iter()
            .any(|(name, text)| name == "trace-services.yaml"
                && text.contains("kind: EndpointSlice")));
        assert!(manifests.iter().any(
            |(name, text)| name == "trace-policy.yaml" && text.contains("kind: NetworkPolicy")
        ));
        for target in TARGETS {
            if target.seeds == Seeds::Manifests {
                for (name, text) in &manifests {
                    assert!(
                        text.len() <= target.max_len,
                        "seed {name} ({} bytes) is longer than {}'s inputs",
                        text.len(),
                        target.name
                    );
                }
            }
        }
        for dictionary in [Seeds::Manifests, Seeds::Packets]
            .into_iter()
            .filter_map(Seeds::dictionary)
        {
            assert!(root.join("fuzz").join(dictionary).is_file(), "{dictionary}");
        }
        let packets = seeds(&root, Seeds::Packets).unwrap();
        assert!(packets.len() >= 50, "{}", packets.len());
        assert!(packets
            .iter()
            .any(|(_, p)| p.contains("->") && p.contains('[')));
    }
}
