//! `cargo xtask image`: what the container image would hold, checked without Docker (no
//! registry is reachable here, so the image itself cannot be built). It runs the Dockerfile's
//! build command for the agent, puts exactly what the final stage copies into an empty
//! directory, and runs the binary there with an empty environment under `chroot`: `--version`, `kernel`
//! (BPF feature probes) and a `trace` of the seed platform (the real programs loaded and run
//! with BPF_PROG_RUN). A binary that needed anything else (a shared library, a file) fails.

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context as _};

use crate::{run, which, workspace_root};

/// The Dockerfile's runtime stage: its base and what it copies from the builder.
#[derive(Debug)]
pub struct FinalStage {
    pub base: String,
    /// (path in the builder, path in the image).
    pub copies: Vec<(String, String)>,
}

/// What the Dockerfile says, read the way `docker build` would need it.
#[derive(Debug)]
pub struct Dockerfile {
    /// `ARG NAME=value` defaults.
    pub args: Vec<(String, String)>,
    /// Every stage's `FROM` line (without `FROM `).
    pub stages: Vec<String>,
    pub final_stage: FinalStage,
    /// The builder's `cargo build` command, `$VAR`s expanded from the ARG defaults.
    pub cargo_build: Vec<String>,
    /// The builder's `install -D SRC DST` of the binary: (SRC relative to the source, DST).
    pub install: (String, String),
}

impl Dockerfile {
    pub fn read(root: &Path) -> anyhow::Result<Dockerfile> {
        let path = root.join("Dockerfile");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Dockerfile> {
        // Continuation lines joined, comments dropped.
        let mut lines = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
                continue;
            }
            match line.strip_suffix('\\') {
                Some(part) => current.push_str(part),
                None => {
                    current.push_str(line);
                    lines.push(std::mem::take(&mut current));
                }
            }
        }
        let mut args = Vec::new();
        let mut stages = Vec::new();
        let mut copies = Vec::new();
        let mut run_lines = Vec::new();
        for line in &lines {
            let (instruction, rest) = line.split_once(' ').unwrap_or((line, ""));
            match instruction {
                "ARG" => {
                    if let Some((name, value)) = rest.trim().split_once('=') {
                        args.push((name.to_owned(), value.to_owned()));
                    }
                }
                "FROM" => {
                    stages.push(rest.trim().to_owned());
                    copies.clear();
                }
                "COPY" => {
                    let words: Vec<&str> = rest.split_whitespace().collect();
                    if let [from, src, dst] = words.as_slice() {
                        if from.starts_with("--from=") {
                            copies.push((src.to_string(), dst.to_string()));
                        }
                    }
                }
                "RUN" => run_lines.push(rest.to_owned()),
                _ => {}
            }
        }
        let expand = |word: &str| -> String {
            let mut word = word.trim_matches('"').to_owned();
            for (name, value) in &args {
                word = word.replace(&format!("${name}"), value);
            }
            word
        };
        let commands: Vec<Vec<String>> = run_lines
            .iter()
            .flat_map(|l| l.split("&&"))
            .map(|c| c.split_whitespace().map(&expand).collect())
            .collect();
        let cargo_build = commands
            .iter()
            .find(|c| c.starts_with(&["cargo".to_owned(), "build".to_owned()]))
            .context("no `cargo build` in a RUN line")?
            .clone();
        let install = commands
            .iter()
            .find(|c| c.first().map(String::as_str) == Some("install"))
            .and_then(|c| match c.as_slice() {
                [_, flag, src, dst] if flag == "-D" => Some((src.clone(), dst.clone())),
                _ => None,
            })
            .context("no `install -D SRC DST` of the binary in a RUN line")?;
        let base = stages.last().context("no FROM")?.clone();
        Ok(Dockerfile {
            args,
            stages,
            final_stage: FinalStage { base, copies },
            cargo_build,
            install,
        })
    }

    pub fn arg(&self, name: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

pub fn check() -> anyhow::Result<()> {
    let root = workspace_root();
    let dockerfile = Dockerfile::read(&root)?;
    if dockerfile.final_stage.base != "scratch" {
        bail!(
            "the Dockerfile's runtime stage is FROM {}: this check (and the image's size) expects \
             scratch and a static binary",
            dockerfile.final_stage.base
        );
    }
    eprintln!(
        "image: {} (as the Dockerfile's builder)",
        dockerfile.cargo_build.join(" ")
    );
    run(Command::new(&dockerfile.cargo_build[0])
        .current_dir(&root)
        .args(&dockerfile.cargo_build[1..]))
    .context(
        "building the image's binary (`cargo xtask setup` installs the musl target and musl-tools)",
    )?;

    let image_root = root.join("target/image-root");
    let _ = fs::remove_dir_all(&image_root);
    fs::create_dir_all(&image_root)?;
    let (built, installed) = &dockerfile.install;
    let mut binary_in_image = None;
    for (src, dst) in &dockerfile.final_stage.copies {
        if src != installed {
            bail!("the runtime stage copies {src}, which the builder does not install");
        }
        let target = image_root.join(dst.trim_start_matches('/'));
        fs::create_dir_all(target.parent().expect("a file's directory"))?;
        fs::copy(root.join(built), &target)
            .with_context(|| format!("copying {built} to {}", target.display()))?;
        binary_in_image = Some(dst.clone());
    }
    let binary = binary_in_image.context("the runtime stage copies no binary")?;
    // A manifests directory for the trace (a bind mount or a ConfigMap would put files there).
    let manifests = image_root.join("manifests");
    fs::create_dir_all(&manifests)?;
    // The seed platform's Services and EndpointSlices (its policies would deny the probe).
    for file in ["services.yaml", "endpointslices.yaml"] {
        fs::copy(
            root.join("examples/ecommerce").join(file),
            manifests.join(file),
        )?;
    }

    let chroot = which("chroot").context("chroot (coreutils) is not installed")?;
    let in_image = |args: &[&str]| -> anyhow::Result<String> {
        // `env -i chroot`: nothing of this environment reaches the binary.
        let out = Command::new(&chroot)
            .env_clear()
            .arg(&image_root)
            .arg(&binary)
            .args(args)
            .output()
            .context("running chroot")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!(
                "`{binary} {}` in a root holding only what the image's last stage copies failed \
                 ({}):\n{text}",
                args.join(" "),
                out.status
            );
        }
        Ok(text)
    };
    let version = in_image(&["--version"])?;
    let kernel = in_image(&["kernel"])?;
    let trace = in_image(&[
        "trace",
        "--manifests",
        "/manifests",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--json",
        "tcp 10.244.1.5 -> 10.96.0.2:3000",
    ])?;
    if !trace.contains("\"verdict\": \"DNAT\"") && !trace.contains("\"verdict\":\"DNAT\"") {
        bail!("the image's binary traced frontend-service without a DNAT:\n{trace}");
    }
    fs::remove_dir_all(&image_root)?;
    println!(
        "image: {} runs alone in an empty root under env -i: {} / {} / trace DNAT",
        binary,
        version.trim(),
        kernel.lines().next().unwrap_or("").trim()
    );
    Ok(())
}
