//! Loading every program of the eBPF object on its own, for the kernel matrix (issue #12):
//! which programs this kernel's verifier accepts, and for a rejected one the verifier's last
//! lines (the whole log of a large program runs to thousands of lines; its end says why).

use aya::{
    programs::{CgroupSockAddr, Program, ProgramError, SchedClassifier},
    VerifierLogLevel,
};

/// How many of the verifier's last lines a rejection keeps.
pub const VERIFIER_TAIL_LINES: usize = 30;

/// One program's load on this kernel.
#[derive(Debug)]
pub struct ProgramLoad {
    pub name: String,
    /// `None` when it loaded; the error with the verifier's last lines otherwise.
    pub error: Option<String>,
}

/// Loads the object with private maps, then each of its programs (tc classifiers and cgroup
/// sock_addr programs), returning every program's outcome; an error only when the object
/// itself (its maps) cannot be loaded.
pub fn load_each_program() -> anyhow::Result<Vec<ProgramLoad>> {
    let mut ebpf = super::features::loader()
        .load(super::object())
        .map_err(|e| anyhow::anyhow!("loading the eBPF object's maps: {e}"))?;
    let mut loads = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        loads.push(ProgramLoad {
            name: name.to_owned(),
            error: load(program).err().map(|e| describe_load_error(name, &e)),
        });
    }
    loads.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(loads)
}

/// Loads a tc or cgroup sock_addr program.
fn load(program: &mut Program) -> Result<(), ProgramError> {
    if let Ok(program) = <&mut SchedClassifier>::try_from(&mut *program) {
        program.load()
    } else if let Ok(program) = <&mut CgroupSockAddr>::try_from(&mut *program) {
        program.load()
    } else {
        Err(ProgramError::UnexpectedProgramType)
    }
}

/// Program `name`'s load error in a few lines: the syscall's error and, for a verifier
/// rejection, the last [`VERIFIER_TAIL_LINES`] lines of the verifier's log (where it says what
/// it refused). The datapath loads with the log off (features::loader), so the program is
/// loaded again, alone, with it on.
pub fn describe_load_error(name: &str, error: &ProgramError) -> String {
    let ProgramError::LoadError { io_error, .. } = error else {
        return error.to_string();
    };
    let log = match logged_load(name) {
        Ok(log) => log,
        Err(e) => return format!("the kernel refused it ({io_error}); no verifier log: {e}"),
    };
    let lines: Vec<&str> = log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(VERIFIER_TAIL_LINES)..];
    format!(
        "the kernel refused it ({io_error}); the verifier's last {} lines:\n{}",
        tail.len(),
        tail.join("\n")
    )
}

/// The verifier's log of loading program `name` on its own, with private maps.
fn logged_load(name: &str) -> anyhow::Result<String> {
    let mut ebpf = super::features::loader()
        .verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS)
        .load(super::object())
        .map_err(|e| anyhow::anyhow!("loading the eBPF object's maps: {e}"))?;
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow::anyhow!("the object has no program {name}"))?;
    match load(program) {
        Ok(()) => anyhow::bail!("it loaded this time"),
        Err(ProgramError::LoadError { verifier_log, .. }) => Ok(verifier_log.to_string()),
        Err(e) => Err(e.into()),
    }
}
