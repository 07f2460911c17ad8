//! Verify and repair (issue #13): what the agent attached and pinned is checked on every
//! periodic resync, and right after start, and put back when something else took it away.
//!
//! * **Programs**: for every interface this agent attached, each hook's program must run
//!   there. On the tcx path (Linux 6.6+) the link pinned at `<pin>/links/<ifindex>-<dir>` must be
//!   a tcx link attached to that ifindex and direction running the loaded program (`bpftool
//!   link detach`, a removed pin or a swapped program break it); on the netlink path (older
//!   kernels) the clsact filter at Sluice's priority and handle must run the loaded program
//!   (`tc filter del`, `tc qdisc del ... clsact` break it). A broken hook is attached again (a
//!   new link, pinned; or the program swapped into the pinned link, or the filter replaced).
//!   A link that still runs the program but lost its pin is pinned again.
//! * **Socket programs** (host traffic), when attached to a cgroup: the link pinned at
//!   `<pin>/cgroup-links/<program>` must be a cgroup link attached to that cgroup (its id, the
//!   directory's inode number) running the loaded program. A detached link (`bpftool link
//!   detach`, attached to no cgroup), a removed pin whose link went with it, or another
//!   program in the link gets the program attached again (swapped into the pinned link, or
//!   a new link pinned); a link that still runs the program there but lost its pin is pinned
//!   again; a pin holding anything else is replaced, and named.
//! * **Map pins**: every map of the object must be pinned under its name and the pin must be
//!   the very map the loaded programs use (same map id). A missing pin is pinned again; a pin
//!   that now holds another object (someone pinned something under Sluice's name) is named,
//!   with its id and type, and our map is pinned in its place (renamed over it, so the name
//!   never disappears). Without this, the next agent start would create empty maps (dropping
//!   every service and established flow) or refuse to start.
//!
//! What a pin holds at start is judged differently: there the agent cannot know whether an
//! object at its name is an old Sluice's or another tool's, so a map pin of another layout
//! ([`super::pinned_map`]) and a link pin that is not a tcx link of that interface and
//! direction ([`refuse_foreign_link_pin`]) are named and refused, never replaced. During a
//! resync the name held the agent's own object a pass ago, so whatever is there now replaced
//! it.
//!
//! A vanished interface (deleted between the scan and the check) is not an error: the next
//! scan forgets it. Each repair is reported as a [`Repair`]; [`RepairLog`] turns them into
//! log lines (one per repair, at most one per component every [`RepairLog::WINDOW`], so a
//! component that keeps breaking does not flood the log) and counts them.
//!
//! The decisions are pure functions ([`judge_tcx`], [`judge_netlink`],
//! [`judge_cgroup_link`], [`judge_map_pin`], [`RepairLog`]), unit-tested below; the rest reads and writes the kernel.

use std::{
    collections::HashMap,
    ffi::CString,
    fs, io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::bail;
use aya::programs::TcAttachType;

use super::{
    attach_netlink, attach_tcx, classifier, classifier_mut, ifindex_of, link_pin_path,
    resize::pin_in_place,
    sock::{
        cgroup_id, obj_get, put_u32, put_u64, sys_bpf, ATTR_SIZE, CGROUP_LINKS_DIR, SOCK_PROGRAMS,
    },
    Attachment, Datapath, Hook, LINKS_DIR, NETLINK_HANDLE, NETLINK_PRIORITY,
};

// ---------------------------------------------------------------------------------------------
// What a pin holds

/// `bpf_link_type` of a cgroup link.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;
/// `bpf_link_type` of a tcx link.
pub const BPF_LINK_TYPE_TCX: u32 = 11;
/// `bpf_attach_type` of tcx ingress and egress.
pub const BPF_TCX_INGRESS: u32 = 46;
pub const BPF_TCX_EGRESS: u32 = 47;

/// The tcx attach type of a tc direction.
pub fn tcx_attach_type(attach_type: TcAttachType) -> u32 {
    match attach_type {
        TcAttachType::Egress => BPF_TCX_EGRESS,
        _ => BPF_TCX_INGRESS,
    }
}

/// A link as `BPF_OBJ_GET_INFO_BY_FD` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub prog_id: u32,
    pub link_type: u32,
    /// tcx links: the interface (0 once detached: `bpftool link detach`, or the interface
    /// was deleted).
    pub ifindex: u32,
    /// tcx links: [`BPF_TCX_INGRESS`] or [`BPF_TCX_EGRESS`].
    pub attach_type: u32,
    /// cgroup links: the id of the cgroup (its inode number on cgroup2fs; 0 once detached:
    /// `bpftool link detach`, or the cgroup was removed).
    pub cgroup_id: u64,
}

impl LinkInfo {
    fn is_tcx(&self, attach_type: u32) -> bool {
        self.link_type == BPF_LINK_TYPE_TCX && self.attach_type == attach_type
    }

    fn describe(&self) -> String {
        if self.link_type == BPF_LINK_TYPE_CGROUP {
            return if self.cgroup_id == 0 {
                format!(
                    "cgroup link {} (program {}, attached to no cgroup)",
                    self.id, self.prog_id
                )
            } else {
                format!(
                    "cgroup link {} (program {} on cgroup id {})",
                    self.id, self.prog_id, self.cgroup_id
                )
            };
        }
        if self.link_type != BPF_LINK_TYPE_TCX {
            return format!(
                "a BPF link of type {} (link id {}, program {})",
                self.link_type, self.id, self.prog_id
            );
        }
        let direction = match self.attach_type {
            BPF_TCX_INGRESS => "ingress",
            BPF_TCX_EGRESS => "egress",
            _ => "an unknown direction",
        };
        if self.ifindex == 0 {
            format!(
                "tcx link {} ({direction}, program {}, attached to no interface)",
                self.id, self.prog_id
            )
        } else {
            format!(
                "tcx link {} (program {} on ifindex {} {direction})",
                self.id, self.prog_id, self.ifindex
            )
        }
    }
}

/// What is pinned at a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinned {
    /// Nothing (nor the directory, maybe).
    Nothing,
    /// A map: its id and what it is (`a Hash map `name` (id 3, 8-byte keys, ...)`).
    Map {
        id: u32,
        about: String,
    },
    Link(LinkInfo),
    /// A program: its id and what it is.
    Program {
        id: u32,
        about: String,
    },
    /// Something that could not be opened or identified.
    Unknown(String),
}

impl Pinned {
    /// What it is, for messages.
    pub fn describe(&self) -> String {
        match self {
            Pinned::Nothing => "nothing".to_owned(),
            Pinned::Map { about, .. } | Pinned::Program { about, .. } => about.clone(),
            Pinned::Link(link) => link.describe(),
            Pinned::Unknown(about) => about.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Decisions (pure)

/// What the pass does about a broken hook or pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fix {
    /// Attach the program: a new tcx link (pinned), the program swapped into the pinned link
    /// (a detached link is replaced), or the netlink filter added or replaced; for a map,
    /// pin it again.
    Attach,
    /// The pin holds something else: put ours in its place.
    ReplacePin,
    /// The tcx link with this id still runs the program there but lost its pin: pin it again.
    PinLink(u32),
    /// The pin cannot be opened or identified: reported as a failed repair, left as it is
    /// (touching what cannot be checked could undo a healthy attachment).
    Leave,
}

/// Something the check found wrong, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// What was found, completing "<component> ..." (e.g. "was detached (...)").
    pub found: String,
    pub fix: Fix,
    /// The pin held an object that is not ours.
    pub foreign: bool,
}

impl Finding {
    fn new(found: String, fix: Fix) -> Finding {
        Finding {
            found,
            fix,
            foreign: false,
        }
    }
}

/// Judges a tcx hook: `pin` is what its link pin holds, `attached` the (program id, link id)
/// pairs tcx runs on `ifindex` in `attach_type` (a `BPF_TCX_*`), `prog_id` the loaded program.
/// `None`: healthy.
pub fn judge_tcx(
    ifindex: u32,
    attach_type: u32,
    prog_id: u32,
    pin: &Pinned,
    attached: &[(u32, u32)],
) -> Option<Finding> {
    match pin {
        Pinned::Nothing => Some(match attached.iter().find(|(prog, _)| *prog == prog_id) {
            Some(&(_, link)) => Finding::new(
                format!("lost its link pin (tcx link {link} still runs the program there)"),
                Fix::PinLink(link),
            ),
            None => Finding::new(
                "was detached (its link pin was gone and no link runs the program there)"
                    .to_owned(),
                Fix::Attach,
            ),
        }),
        Pinned::Link(link) if link.is_tcx(attach_type) && link.ifindex == ifindex => {
            if !attached.iter().any(|(_, id)| *id == link.id) {
                Some(Finding::new(
                    format!("was detached ({} is not attached there)", link.describe()),
                    Fix::Attach,
                ))
            } else if link.prog_id != prog_id {
                Some(Finding::new(
                    format!(
                        "ran program {} instead of the loaded one ({prog_id}) in tcx link {}",
                        link.prog_id, link.id
                    ),
                    Fix::Attach,
                ))
            } else {
                None
            }
        }
        Pinned::Unknown(about) => Some(unreadable(about)),
        Pinned::Link(link) if link.is_tcx(attach_type) && link.ifindex == 0 => Some(Finding::new(
            format!(
                "was detached (its tcx link {} is attached to no interface)",
                link.id
            ),
            Fix::Attach,
        )),
        other => Some(Finding {
            found: format!(
                "was not attached: its link pin held {} instead of Sluice's tcx link",
                other.describe()
            ),
            fix: Fix::ReplacePin,
            foreign: true,
        }),
    }
}

/// Judges a socket program's cgroup link: `pin` is what its link pin holds, `cgroup_id` the
/// cgroup it was attached to, `prog_id` the loaded program, `links` the cgroup links of the
/// system (only looked at when the pin is gone: one running the program on that cgroup lost
/// only its pin). `None`: healthy.
pub fn judge_cgroup_link(
    cgroup_id: u64,
    prog_id: u32,
    pin: &Pinned,
    links: &[LinkInfo],
) -> Option<Finding> {
    match pin {
        Pinned::Nothing => Some(
            match links.iter().find(|l| {
                l.link_type == BPF_LINK_TYPE_CGROUP
                    && l.prog_id == prog_id
                    && l.cgroup_id == cgroup_id
            }) {
                Some(link) => Finding::new(
                    format!(
                        "lost its link pin (cgroup link {} still runs the program there)",
                        link.id
                    ),
                    Fix::PinLink(link.id),
                ),
                None => Finding::new(
                    "was detached (its link pin was gone and no link runs the program there)"
                        .to_owned(),
                    Fix::Attach,
                ),
            },
        ),
        Pinned::Link(link) if link.link_type == BPF_LINK_TYPE_CGROUP => {
            if link.cgroup_id == 0 {
                Some(Finding::new(
                    format!(
                        "was detached (its cgroup link {} is attached to no cgroup)",
                        link.id
                    ),
                    Fix::Attach,
                ))
            } else if link.cgroup_id != cgroup_id {
                Some(Finding {
                    found: format!(
                        "was not attached: its link pin held {} instead of Sluice's link on \
                         cgroup id {cgroup_id}",
                        link.describe()
                    ),
                    fix: Fix::ReplacePin,
                    foreign: true,
                })
            } else if link.prog_id != prog_id {
                Some(Finding::new(
                    format!(
                        "ran program {} instead of the loaded one ({prog_id}) in cgroup link {}",
                        link.prog_id, link.id
                    ),
                    Fix::Attach,
                ))
            } else {
                None
            }
        }
        Pinned::Unknown(about) => Some(unreadable(about)),
        other => Some(Finding {
            found: format!(
                "was not attached: its link pin held {} instead of Sluice's cgroup link",
                other.describe()
            ),
            fix: Fix::ReplacePin,
            foreign: true,
        }),
    }
}

fn unreadable(about: &str) -> Finding {
    Finding::new(
        format!("could not be checked: its pin holds {about}"),
        Fix::Leave,
    )
}

/// A tc filter on a clsact hook, as a netlink dump lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    pub kind: String,
    /// `bpf` filters: the program they run.
    pub prog_id: Option<u32>,
}

/// Judges a netlink (pre-tcx) hook: `filters` are those on the hook's clsact side (none when
/// the clsact qdisc is gone), `prog_id` the loaded program. `None`: healthy.
pub fn judge_netlink(prog_id: u32, filters: &[Filter]) -> Option<Finding> {
    let handle = u32::from(NETLINK_HANDLE);
    let ours = filters
        .iter()
        .find(|f| f.priority == NETLINK_PRIORITY && f.handle == handle);
    match ours {
        None => Some(Finding::new(
            format!(
                "was detached (no tc filter at priority {NETLINK_PRIORITY}, handle {handle:#x}; \
                 {} other filters, the clsact qdisc may be gone)",
                filters.len()
            ),
            Fix::Attach,
        )),
        Some(filter) if filter.prog_id == Some(prog_id) => None,
        Some(filter) => Some(Finding::new(
            match filter.prog_id {
                Some(other) => format!(
                    "ran program {other} instead of the loaded one ({prog_id}) in its tc filter"
                ),
                None => format!(
                    "was replaced by a `{}` tc filter at its priority and handle",
                    filter.kind
                ),
            },
            Fix::Attach,
        )),
    }
}

/// Judges a map pin: `pin` is what the pin holds, `map_id` the map the programs use. `None`:
/// healthy.
pub fn judge_map_pin(map_id: u32, pin: &Pinned) -> Option<Finding> {
    match pin {
        Pinned::Map { id, .. } if *id == map_id => None,
        Pinned::Unknown(about) => Some(unreadable(about)),
        Pinned::Nothing => Some(Finding::new(
            format!("was no longer pinned (the programs use map id {map_id})"),
            Fix::Attach,
        )),
        other => Some(Finding {
            found: format!(
                "was replaced: its pin held {}, not the map the programs use (id {map_id})",
                other.describe()
            ),
            fix: Fix::ReplacePin,
            foreign: true,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting (pure)

/// One repair the pass made, or tried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repair {
    /// The component, stable across passes (rate limiting): `link <ifindex>-<dir>`,
    /// `cgroup-link <program>`, `cgroup <path>`, `map <name>`, `dir <path>`.
    pub key: String,
    /// The component for people: "from_pod on veth1a2b (ifindex 7)", "map `services`".
    pub what: String,
    /// What was wrong, completing `what`.
    pub found: String,
    /// What the pass did, or why it could not.
    pub outcome: Result<String, String>,
    /// The pin held an object that is not ours (logged as an error).
    pub foreign: bool,
}

/// How a log line is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Warn,
    Error,
}

/// Counts repairs and rate-limits their log lines: each component gets one line per
/// [`RepairLog::WINDOW`]; the next line says how many repairs of it went unlogged meanwhile.
/// At most [`RepairLog::LINES_PER_PASS`] lines per pass (a node whose every pin was removed
/// gets a summary for the rest).
#[derive(Debug, Default)]
pub struct RepairLog {
    /// Component -> when its last line was logged, repairs since not logged.
    logged: HashMap<String, (Instant, u64)>,
    /// Repairs made since the agent started.
    pub repaired: u64,
    /// Repairs tried that failed.
    pub failed: u64,
}

impl RepairLog {
    pub const WINDOW: Duration = Duration::from_secs(300);
    pub const LINES_PER_PASS: usize = 20;

    /// Counts the repairs of one pass and returns the lines to log.
    pub fn record(&mut self, repairs: &[Repair], now: Instant) -> Vec<(Level, String)> {
        let mut lines = Vec::new();
        let mut unlogged = 0usize;
        for repair in repairs {
            match repair.outcome {
                Ok(_) => self.repaired += 1,
                Err(_) => self.failed += 1,
            }
            let quiet = match self.logged.get_mut(&repair.key) {
                Some((at, quiet)) if now.duration_since(*at) < Self::WINDOW => {
                    *quiet += 1;
                    continue;
                }
                Some((_, quiet)) => *quiet,
                None => 0,
            };
            if lines.len() >= Self::LINES_PER_PASS {
                // Not logged now: the next pass may.
                unlogged += 1;
                continue;
            }
            self.logged.insert(repair.key.clone(), (now, 0));
            let since = if quiet > 0 {
                format!(
                    " ({quiet} earlier repair{} of it in the last {} min not logged)",
                    if quiet == 1 { "" } else { "s" },
                    Self::WINDOW.as_secs() / 60
                )
            } else {
                String::new()
            };
            lines.push(match &repair.outcome {
                Ok(done) => (
                    if repair.foreign {
                        Level::Error
                    } else {
                        Level::Warn
                    },
                    format!("repaired: {} {}; {done}{since}", repair.what, repair.found),
                ),
                Err(error) => (
                    Level::Error,
                    format!(
                        "not repaired: {} {}; {error}{since}",
                        repair.what, repair.found
                    ),
                ),
            });
        }
        if unlogged > 0 {
            lines.push((
                Level::Warn,
                format!("{unlogged} more repairs in this pass not logged one by one"),
            ));
        }
        lines
    }
}

// ---------------------------------------------------------------------------------------------
// The pass

impl Datapath {
    /// Checks every attachment this agent made and every pin under the pin directory, repairs
    /// what is broken, and reports each repair (nothing when all is well). A private datapath
    /// has nothing to check. Never fails as a whole: a repair that fails is reported as such
    /// and tried again at the next pass.
    pub fn verify_and_repair(&mut self) -> Vec<Repair> {
        let Some(pin_path) = self.pin_path.clone() else {
            return Vec::new();
        };
        let mut repairs = Vec::new();
        let links_dir = pin_path.join(LINKS_DIR);
        if !links_dir.exists() {
            let outcome = fs::create_dir_all(&links_dir)
                .map(|()| "created it again".to_owned())
                .map_err(|e| format!("creating it: {e}"));
            repairs.push(Repair {
                key: format!("dir {}", links_dir.display()),
                what: format!("pin directory {}", links_dir.display()),
                found: "was gone".to_owned(),
                outcome,
                foreign: false,
            });
        }
        self.repair_map_pins(&pin_path, &mut repairs);
        self.repair_attachments(&pin_path, &mut repairs);
        self.repair_cgroup_links(&pin_path, &mut repairs);
        repairs
    }

    /// The socket programs' cgroup links (host traffic), when [`Datapath::attach_cgroup`]
    /// attached them: each pinned at `<pin>/cgroup-links/<program>`, a cgroup link on that
    /// cgroup running the loaded program.
    fn repair_cgroup_links(&mut self, pin_path: &Path, repairs: &mut Vec<Repair>) {
        let Some(cgroup) = self.cgroup.clone() else {
            return;
        };
        let cgroup_id = match cgroup_id(&cgroup) {
            Ok(id) => id,
            Err(e) => {
                // Removed (or unmounted): nothing can run there until it exists again.
                repairs.push(Repair {
                    key: format!("cgroup {}", cgroup.display()),
                    what: format!("the socket programs' cgroup {}", cgroup.display()),
                    found: "could not be opened".to_owned(),
                    outcome: Err(format!("{e:#}")),
                    foreign: false,
                });
                return;
            }
        };
        let links_dir = pin_path.join(CGROUP_LINKS_DIR);
        let mut system_links: Option<Vec<LinkInfo>> = None;
        for name in SOCK_PROGRAMS {
            let Some(prog_id) = self.sock_program_id(name) else {
                continue;
            };
            let link_pin = links_dir.join(name);
            let pinned = inspect_pin(&link_pin);
            let links: &[LinkInfo] = if pinned == Pinned::Nothing {
                system_links.get_or_insert_with(|| {
                    cgroup_links().unwrap_or_else(|e| {
                        tracing::debug!("listing the cgroup links: {e}");
                        Vec::new()
                    })
                })
            } else {
                &[]
            };
            let Some(finding) = judge_cgroup_link(cgroup_id, prog_id, &pinned, links) else {
                continue;
            };
            let outcome =
                self.repair_cgroup_link(name, &cgroup, cgroup_id, prog_id, &link_pin, &finding);
            repairs.push(Repair {
                key: format!("cgroup-link {name}"),
                what: format!("`{name}` on cgroup {}", cgroup.display()),
                found: finding.found,
                outcome,
                foreign: finding.foreign,
            });
        }
    }

    fn repair_cgroup_link(
        &mut self,
        name: &str,
        cgroup: &Path,
        cgroup_id: u64,
        prog_id: u32,
        link_pin: &Path,
        finding: &Finding,
    ) -> Result<String, String> {
        if let Some(done) = prepare_link_pin("cgroup", link_pin, finding)? {
            return Ok(done);
        }
        let swapped = self
            .reattach_sock_program(name, cgroup, cgroup_id, link_pin)
            .map_err(|e| format!("{e:#}"))?;
        let link = match inspect_pin(link_pin) {
            Pinned::Link(link) => format!("cgroup link id {}", link.id),
            _ => "a cgroup link".to_owned(),
        };
        Ok(if swapped {
            format!("swapped the loaded program ({prog_id}) into its {link}")
        } else {
            format!("re-attached ({link}, pinned at {})", link_pin.display())
        })
    }

    fn repair_map_pins(&mut self, pin_path: &Path, repairs: &mut Vec<Repair>) {
        for &(name, map_id) in &self.map_ids {
            let pin = pin_path.join(name);
            let Some(finding) = judge_map_pin(map_id, &inspect_pin(&pin)) else {
                continue;
            };
            let outcome = if finding.fix == Fix::Leave {
                Err("left as it is".to_owned())
            } else {
                aya::maps::MapInfo::from_id(map_id)
                    .and_then(|info| info.fd())
                    .map_err(|e| format!("opening map id {map_id}: {e}"))
                    .and_then(|fd| {
                        pin_in_place(fd.as_fd(), &pin).map_err(|e| format!("{e:#}"))?;
                        Ok(match finding.fix {
                            Fix::ReplacePin => format!(
                                "pinned map id {map_id} in its place at {} (the other object lost \
                             that name)",
                                pin.display()
                            ),
                            _ => format!("pinned map id {map_id} at {} again", pin.display()),
                        })
                    })
            };
            repairs.push(Repair {
                key: format!("map {name}"),
                what: format!("map `{name}`"),
                found: finding.found,
                outcome,
                foreign: finding.foreign,
            });
        }
    }

    fn repair_attachments(&mut self, pin_path: &Path, repairs: &mut Vec<Repair>) {
        let attached: Vec<(u32, &'static [Hook; 2], Attachment)> = self
            .attached
            .iter()
            .map(|(ifindex, (role, attachment))| (*ifindex, role.hooks(), attachment.clone()))
            .collect();
        for (ifindex, hooks, attachment) in attached {
            let ifname = attachment.ifname().to_owned();
            // Deleted (or replaced) since the scan: the next scan forgets it.
            if !interface_is(&ifname, ifindex) {
                continue;
            }
            for hook in hooks {
                let prog_id = match classifier(&self.ebpf, hook.program).info() {
                    Ok(info) => info.id(),
                    Err(e) => {
                        tracing::debug!("reading the id of `{}`: {e}", hook.program);
                        continue;
                    }
                };
                let what = format!("{} on {ifname} (ifindex {ifindex})", hook.program);
                let key = format!("link {ifindex}-{}", hook.direction);
                let (finding, outcome) = match attachment {
                    Attachment::Tcx { .. } => {
                        let link_pin = link_pin_path(pin_path, ifindex, hook.direction);
                        let attach_type = tcx_attach_type(hook.attach_type);
                        let running = match tcx_query(ifindex, attach_type) {
                            Ok(running) => running,
                            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => break,
                            Err(e) => {
                                tracing::debug!("querying tcx {what}: {e}");
                                continue;
                            }
                        };
                        let pinned = inspect_pin(&link_pin);
                        let Some(finding) =
                            judge_tcx(ifindex, attach_type, prog_id, &pinned, &running)
                        else {
                            continue;
                        };
                        let outcome = self.repair_tcx(hook, &ifname, ifindex, &link_pin, &finding);
                        (finding, outcome)
                    }
                    Attachment::Netlink { .. } => {
                        let filters = match netlink_filters(ifindex, hook.attach_type) {
                            Ok(filters) => filters,
                            Err(e) => {
                                tracing::debug!("listing the tc filters of {what}: {e}");
                                continue;
                            }
                        };
                        let Some(finding) = judge_netlink(prog_id, &filters) else {
                            continue;
                        };
                        let program = classifier_mut(&mut self.ebpf, hook.program);
                        let outcome = attach_netlink(program, &ifname, hook.attach_type)
                            .map(|()| {
                                format!(
                                    "re-attached (tc filter priority {NETLINK_PRIORITY} runs \
                                     program {prog_id})"
                                )
                            })
                            .map_err(|e| format!("{e:#}"));
                        (finding, outcome)
                    }
                };
                if outcome.is_err() && !interface_is(&ifname, ifindex) {
                    // It went while being repaired.
                    break;
                }
                repairs.push(Repair {
                    key,
                    what,
                    found: finding.found,
                    outcome,
                    foreign: finding.foreign,
                });
            }
        }
    }

    fn repair_tcx(
        &mut self,
        hook: &Hook,
        ifname: &str,
        ifindex: u32,
        link_pin: &Path,
        finding: &Finding,
    ) -> Result<String, String> {
        if let Some(done) = prepare_link_pin("tcx", link_pin, finding)? {
            return Ok(done);
        }
        let program = classifier_mut(&mut self.ebpf, hook.program);
        attach_tcx(program, ifname, ifindex, hook.attach_type, link_pin)
            .map_err(|e| format!("{e:#}"))?;
        Ok(match inspect_pin(link_pin) {
            Pinned::Link(link) => format!(
                "re-attached (tcx link id {}, pinned at {})",
                link.id,
                link_pin.display()
            ),
            _ => format!("re-attached (pinned at {})", link_pin.display()),
        })
    }
}

/// Whether `ifname` still names interface `ifindex`.
fn interface_is(ifname: &str, ifindex: u32) -> bool {
    matches!(ifindex_of(ifname), Ok(current) if current == ifindex)
}

/// At start, before an earlier agent's link pinned at `pin` is reused for `ifindex` and
/// `attach_type`: fails, naming the pin and what it holds, unless it is a tcx link of that
/// direction on that interface or one attached nowhere any more (the interface was deleted,
/// or the link detached: [`attach_tcx`] replaces it). Nothing is removed: the pin directory is
/// Sluice's, but an object this agent did not pin there may be another tool's.
pub(super) fn refuse_foreign_link_pin(
    pin: &Path,
    ifindex: u32,
    attach_type: TcAttachType,
) -> anyhow::Result<()> {
    let tcx = tcx_attach_type(attach_type);
    match inspect_pin(pin) {
        Pinned::Nothing => Ok(()),
        Pinned::Link(link)
            if link.is_tcx(tcx) && (link.ifindex == ifindex || link.ifindex == 0) =>
        {
            Ok(())
        }
        // Let the attach say what it cannot open.
        Pinned::Unknown(_) => Ok(()),
        other => bail!(
            "{} holds {}, not a tcx link Sluice pinned for ifindex {ifindex}: refusing to \
             replace what this agent did not pin (remove it, or run `sluice cleanup`, to let \
             Sluice attach here)",
            pin.display(),
            other.describe()
        ),
    }
}

/// At start, before a map pinned at `pin` is reused: fails, naming the pin and what it holds,
/// when it is not a map at all (a link, a program).
pub(super) fn refuse_non_map_pin(pin: &Path) -> anyhow::Result<()> {
    match inspect_pin(pin) {
        found @ (Pinned::Link(_) | Pinned::Program { .. }) => bail!(
            "{} holds {}, not a map: it was not pinned by Sluice (remove it, or run `sluice \
             cleanup`)",
            pin.display(),
            found.describe()
        ),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel reads and writes aya does not offer (uapi/linux/bpf.h)

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;

/// What is pinned at `path`.
pub fn inspect_pin(path: &Path) -> Pinned {
    let fd = match obj_get(path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Pinned::Nothing,
        Err(e) => return Pinned::Unknown(format!("an object that cannot be opened ({e})")),
    };
    let kind = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|target| target.to_string_lossy().into_owned())
        .unwrap_or_default();
    match kind.as_str() {
        "anon_inode:bpf-map" => describe_map(fd),
        "anon_inode:bpf-link" => match link_info(fd.as_fd()) {
            Ok(info) => Pinned::Link(info),
            Err(e) => Pinned::Unknown(format!("a BPF link whose info cannot be read ({e})")),
        },
        "anon_inode:bpf-prog" => describe_program(fd.as_fd()),
        other => Pinned::Unknown(format!("an object of unknown kind ({other:?})")),
    }
}

fn describe_map(fd: OwnedFd) -> Pinned {
    let info = match aya::maps::MapData::from_fd(fd).and_then(|map| map.info()) {
        Ok(info) => info,
        Err(e) => return Pinned::Unknown(format!("a BPF map whose info cannot be read ({e})")),
    };
    let map_type = info.map_type().map_or_else(
        |_| "map of unknown type".to_owned(),
        |t| format!("{t:?} map"),
    );
    Pinned::Map {
        id: info.id(),
        about: format!(
            "a {map_type} `{}` (map id {}, {}-byte keys, {}-byte values, {} entries)",
            info.name_as_str().unwrap_or("?"),
            info.id(),
            info.key_size(),
            info.value_size(),
            info.max_entries()
        ),
    }
}

/// `struct bpf_prog_info`: type at 0, id at 4, name (16 bytes) at 64.
fn describe_program(fd: BorrowedFd<'_>) -> Pinned {
    let mut info = [0u8; 128];
    if let Err(e) = obj_info(fd, &mut info) {
        return Pinned::Unknown(format!("a BPF program whose info cannot be read ({e})"));
    }
    let prog_type = u32::from_ne_bytes(info[0..4].try_into().expect("4 bytes"));
    let id = u32::from_ne_bytes(info[4..8].try_into().expect("4 bytes"));
    let name: String = info[64..80]
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| char::from(*b))
        .collect();
    Pinned::Program {
        id,
        about: format!("a BPF program `{name}` (program id {id}, type {prog_type})"),
    }
}

fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<()> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// `struct bpf_link_info`: type, id, prog_id, then (8-aligned, at 16) `tcx.ifindex`,
/// `tcx.attach_type`, or `cgroup.cgroup_id` (u64).
fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = [0u8; 64];
    obj_info(fd, &mut info)?;
    let word = |at: usize| u32::from_ne_bytes(info[at..at + 4].try_into().expect("4 bytes"));
    let link_type = word(0);
    let tcx = link_type == BPF_LINK_TYPE_TCX;
    let cgroup_id = if link_type == BPF_LINK_TYPE_CGROUP {
        u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes"))
    } else {
        0
    };
    Ok(LinkInfo {
        cgroup_id,
        link_type,
        id: word(4),
        prog_id: word(8),
        ifindex: if tcx { word(16) } else { 0 },
        attach_type: if tcx { word(20) } else { 0 },
    })
}

/// Pins `fd` at `path` (`BPF_OBJ_PIN`: pathname u64, bpf_fd u32).
fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u8; ATTR_SIZE];
    put_u64(&mut attr, 0, c_path.as_ptr() as u64);
    put_u32(&mut attr, 8, fd.as_raw_fd() as u32);
    sys_bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Every cgroup link of the system (`BPF_LINK_GET_NEXT_ID`: start_id u32, next_id u32 at 4).
/// Links released while listed are skipped.
fn cgroup_links() -> io::Result<Vec<LinkInfo>> {
    let mut links = Vec::new();
    let mut id = 0u32;
    loop {
        let mut attr = [0u8; ATTR_SIZE];
        put_u32(&mut attr, 0, id);
        match sys_bpf(BPF_LINK_GET_NEXT_ID, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(links),
            Err(e) => return Err(e),
        }
        id = u32::from_ne_bytes(attr[4..8].try_into().expect("4 bytes"));
        let fd = match link_fd_by_id(id) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let info = link_info(fd.as_fd())?;
        if info.link_type == BPF_LINK_TYPE_CGROUP {
            links.push(info);
        }
    }
}

/// A descriptor of link `id` (`BPF_LINK_GET_FD_BY_ID`: link_id u32).
fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, id);
    let fd = sys_bpf(BPF_LINK_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The (program id, link id) pairs tcx runs on `ifindex` in `attach_type` (a `BPF_TCX_*`), in
/// order (`BPF_PROG_QUERY`: target_ifindex u32, attach_type u32, query_flags, attach_flags,
/// prog_ids u64 at 16, count u32 at 24, prog_attach_flags u64 at 32, link_ids u64 at 40).
pub fn tcx_query(ifindex: u32, attach_type: u32) -> io::Result<Vec<(u32, u32)>> {
    const CAPACITY: usize = 64;
    let mut prog_ids = [0u32; CAPACITY];
    let mut link_ids = [0u32; CAPACITY];
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, ifindex);
    put_u32(&mut attr, 4, attach_type);
    put_u64(&mut attr, 16, prog_ids.as_mut_ptr() as u64);
    put_u32(&mut attr, 24, CAPACITY as u32);
    put_u64(&mut attr, 40, link_ids.as_mut_ptr() as u64);
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    let count = u32::from_ne_bytes(attr[24..28].try_into().expect("4 bytes")) as usize;
    Ok((0..count.min(CAPACITY))
        .map(|i| (prog_ids[i], link_ids[i]))
        .collect())
}

/// The tc filters on the `attach_type` side of `ifindex`'s clsact qdisc (none without the
/// qdisc, or when the interface is gone), with a netlink dump (`RTM_GETTFILTER`) on a socket
/// of the calling thread's network namespace.
pub fn netlink_filters(ifindex: u32, attach_type: TcAttachType) -> io::Result<Vec<Filter>> {
    use rtnetlink::{
        packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST},
        packet_route::{
            tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
            RouteNetlinkMessage,
        },
        sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr},
    };
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut message = TcMessage::default();
    message.header.index = ifindex as i32;
    message.header.parent = TcHandle {
        major: 0xffff,
        minor: match attach_type {
            TcAttachType::Egress => TcHandle::MIN_EGRESS,
            _ => TcHandle::MIN_INGRESS,
        },
    };
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetTrafficFilter(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.header.sequence_number = 1;
    request.finalize();
    let mut buffer = vec![0u8; request.buffer_len()];
    request.serialize(&mut buffer);
    socket.send(&buffer, 0)?;

    let mut filters = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full()?;
        if data.is_empty() {
            return Ok(filters);
        }
        let mut offset = 0;
        while offset < data.len() {
            let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                .map_err(io::Error::other)?;
            let length = message.header.length as usize;
            if length == 0 {
                return Ok(filters);
            }
            offset += (length + 3) & !3;
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(filters),
                NetlinkPayload::Error(error) => {
                    return match error.code {
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        None => Ok(filters),
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(tc)) => {
                    let mut filter = Filter {
                        priority: (tc.header.info >> 16) as u16,
                        handle: u32::from(tc.header.handle),
                        kind: String::new(),
                        prog_id: None,
                    };
                    for attribute in &tc.attributes {
                        match attribute {
                            TcAttribute::Kind(kind) => filter.kind = kind.clone(),
                            TcAttribute::Options(options) => {
                                for option in options {
                                    if let TcOption::Bpf(TcFilterBpfOption::ProgId(id)) = option {
                                        filter.prog_id = Some(*id);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    filters.push(filter);
                }
                _ => {}
            }
        }
    }
}

/// The first steps of repairing a link pin, the same for tcx and cgroup links (`kind`): a
/// finding left alone is an error; a link that only lost its pin is pinned again (`Some`:
/// done); a pin to replace is removed. `None`: attach a new link at `link_pin` next.
fn prepare_link_pin(
    kind: &str,
    link_pin: &Path,
    finding: &Finding,
) -> Result<Option<String>, String> {
    if finding.fix == Fix::Leave {
        return Err("left as it is".to_owned());
    }
    if let Some(dir) = link_pin.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    if let Fix::PinLink(link_id) = finding.fix {
        match link_fd_by_id(link_id).and_then(|fd| obj_pin(fd.as_fd(), link_pin)) {
            Ok(()) => {
                return Ok(Some(format!(
                    "pinned {kind} link id {link_id} at {} again",
                    link_pin.display()
                )))
            }
            // Released meanwhile (an unpinned link goes after an RCU grace period): attach.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(format!("pinning {kind} link {link_id}: {e}")),
        }
    }
    if finding.fix == Fix::ReplacePin {
        match fs::remove_file(link_pin) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("unpinning {}: {e}", link_pin.display())),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IFINDEX: u32 = 7;
    const PROG: u32 = 100;

    fn tcx_link(id: u32, prog_id: u32, ifindex: u32) -> Pinned {
        Pinned::Link(LinkInfo {
            id,
            prog_id,
            link_type: BPF_LINK_TYPE_TCX,
            ifindex,
            attach_type: BPF_TCX_INGRESS,
            cgroup_id: 0,
        })
    }

    fn judge(pin: &Pinned, attached: &[(u32, u32)]) -> Option<Finding> {
        judge_tcx(IFINDEX, BPF_TCX_INGRESS, PROG, pin, attached)
    }

    #[test]
    fn a_tcx_link_running_the_program_where_it_should_is_healthy() {
        assert_eq!(judge(&tcx_link(42, PROG, IFINDEX), &[(PROG, 42)]), None);
        // Other programs before or after ours are none of its business.
        assert_eq!(
            judge(&tcx_link(42, PROG, IFINDEX), &[(5, 9), (PROG, 42)]),
            None
        );
    }

    #[test]
    fn a_detached_tcx_link_is_attached_again() {
        // `bpftool link detach`: the pin still holds the link, attached nowhere.
        let finding = judge(&tcx_link(42, PROG, 0), &[]).unwrap();
        assert_eq!(finding.fix, Fix::Attach);
        assert!(!finding.foreign);
        assert!(finding.found.contains("detached"), "{finding:?}");
        assert!(finding.found.contains("tcx link 42"), "{finding:?}");
        // Its pin removed: the link went with it.
        let finding = judge(&Pinned::Nothing, &[]).unwrap();
        assert_eq!(finding.fix, Fix::Attach);
        assert!(finding.found.contains("detached"), "{finding:?}");
    }

    #[test]
    fn a_link_that_lost_only_its_pin_is_pinned_again() {
        let finding = judge(&Pinned::Nothing, &[(PROG, 43)]).unwrap();
        assert_eq!(finding.fix, Fix::PinLink(43));
        // Another program's link there is not ours to pin.
        assert_eq!(
            judge(&Pinned::Nothing, &[(5, 44)]).unwrap().fix,
            Fix::Attach
        );
    }

    #[test]
    fn a_pin_that_cannot_be_read_is_reported_and_left() {
        let unknown = Pinned::Unknown("an object that cannot be opened (EACCES)".into());
        let finding = judge(&unknown, &[(PROG, 42)]).unwrap();
        assert_eq!(finding.fix, Fix::Leave);
        assert!(finding.found.contains("EACCES"), "{finding:?}");
        assert_eq!(judge_map_pin(12, &unknown).unwrap().fix, Fix::Leave);
    }

    #[test]
    fn another_program_in_the_link_is_swapped_out() {
        let finding = judge(&tcx_link(42, 99, IFINDEX), &[(99, 42)]).unwrap();
        assert_eq!(finding.fix, Fix::Attach);
        assert!(finding.found.contains("program 99"), "{finding:?}");
    }

    #[test]
    fn a_pin_holding_something_else_is_replaced_and_named() {
        for (pin, named) in [
            (
                Pinned::Map {
                    id: 3,
                    about: "a Hash map `x` (map id 3)".into(),
                },
                "map id 3",
            ),
            // A tcx link of another interface, another direction, a link of another type.
            (tcx_link(50, PROG, 8), "ifindex 8"),
            (
                Pinned::Link(LinkInfo {
                    attach_type: BPF_TCX_EGRESS,
                    ..match tcx_link(51, PROG, IFINDEX) {
                        Pinned::Link(l) => l,
                        _ => unreachable!(),
                    }
                }),
                "egress",
            ),
            (
                Pinned::Link(LinkInfo {
                    id: 52,
                    prog_id: 1,
                    link_type: 2,
                    ifindex: 0,
                    attach_type: 0,
                    cgroup_id: 0,
                }),
                "type 2",
            ),
        ] {
            let finding = judge(&pin, &[]).unwrap();
            assert_eq!(finding.fix, Fix::ReplacePin, "{pin:?}");
            assert!(finding.foreign);
            assert!(finding.found.contains(named), "{named}: {finding:?}");
        }
    }

    const CGROUP: u64 = 4242;

    fn cgroup_link(id: u32, prog_id: u32, cgroup_id: u64) -> LinkInfo {
        LinkInfo {
            id,
            prog_id,
            link_type: BPF_LINK_TYPE_CGROUP,
            ifindex: 0,
            attach_type: 0,
            cgroup_id,
        }
    }

    fn judge_cgroup(pin: &Pinned, links: &[LinkInfo]) -> Option<Finding> {
        judge_cgroup_link(CGROUP, PROG, pin, links)
    }

    #[test]
    fn a_cgroup_link_running_the_program_on_the_cgroup_is_healthy() {
        let pin = Pinned::Link(cgroup_link(42, PROG, CGROUP));
        assert_eq!(judge_cgroup(&pin, &[]), None);
    }

    #[test]
    fn a_detached_or_missing_cgroup_link_is_attached_again() {
        // `bpftool link detach` (or the cgroup removed): attached to no cgroup.
        let finding = judge_cgroup(&Pinned::Link(cgroup_link(42, PROG, 0)), &[]).unwrap();
        assert_eq!(finding.fix, Fix::Attach);
        assert!(!finding.foreign);
        assert!(finding.found.contains("detached"), "{finding:?}");
        assert!(finding.found.contains("cgroup link 42"), "{finding:?}");
        // The pin removed and the link released with it; links of other programs or
        // cgroups are not ours.
        let others = [
            cgroup_link(43, 99, CGROUP),
            cgroup_link(44, PROG, CGROUP + 1),
            LinkInfo {
                link_type: BPF_LINK_TYPE_TCX,
                ..cgroup_link(45, PROG, CGROUP)
            },
        ];
        let finding = judge_cgroup(&Pinned::Nothing, &others).unwrap();
        assert_eq!(finding.fix, Fix::Attach);
        assert!(finding.found.contains("detached"), "{finding:?}");
    }

    #[test]
    fn a_cgroup_link_that_lost_only_its_pin_is_pinned_again() {
        let links = [cgroup_link(43, 99, CGROUP), cgroup_link(46, PROG, CGROUP)];
        let finding = judge_cgroup(&Pinned::Nothing, &links).unwrap();
        assert_eq!(finding.fix, Fix::PinLink(46));
        assert!(finding.found.contains("lost its link pin"), "{finding:?}");
    }

    #[test]
    fn a_cgroup_link_running_another_program_gets_the_loaded_one() {
        let finding = judge_cgroup(&Pinned::Link(cgroup_link(42, 99, CGROUP)), &[]).unwrap();
        assert_eq!(finding.fix, Fix::Attach);
        assert!(finding.found.contains("program 99"), "{finding:?}");
    }

    #[test]
    fn a_cgroup_link_pin_holding_something_else_is_replaced_and_named() {
        for (pin, named) in [
            (
                Pinned::Link(cgroup_link(50, PROG, CGROUP + 1)),
                "cgroup id 4243",
            ),
            (tcx_link(51, PROG, IFINDEX), "tcx link 51"),
            (
                Pinned::Map {
                    id: 3,
                    about: "a Hash map `x` (map id 3)".into(),
                },
                "map id 3",
            ),
        ] {
            let finding = judge_cgroup(&pin, &[]).unwrap();
            assert_eq!(finding.fix, Fix::ReplacePin, "{pin:?}");
            assert!(finding.foreign);
            assert!(finding.found.contains(named), "{named}: {finding:?}");
        }
        let unknown = Pinned::Unknown("an object that cannot be opened (EACCES)".into());
        assert_eq!(judge_cgroup(&unknown, &[]).unwrap().fix, Fix::Leave);
    }

    fn ours(prog_id: Option<u32>) -> Filter {
        Filter {
            priority: NETLINK_PRIORITY,
            handle: 0x5c1,
            kind: "bpf".into(),
            prog_id,
        }
    }

    #[test]
    fn netlink_hooks_are_judged_by_the_filter_at_sluices_priority_and_handle() {
        assert_eq!(judge_netlink(PROG, &[ours(Some(PROG))]), None);
        // tc filter del / tc qdisc del clsact.
        let finding = judge_netlink(PROG, &[]).unwrap();
        assert_eq!(finding.fix, Fix::Attach);
        assert!(finding.found.contains("detached"), "{finding:?}");
        // Another tool's filter elsewhere does not count as ours.
        let other = Filter {
            priority: 1,
            ..ours(Some(PROG))
        };
        assert_eq!(judge_netlink(PROG, &[other]).unwrap().fix, Fix::Attach);
        // Our filter running another program (an older agent's) gets ours swapped in.
        let finding = judge_netlink(PROG, &[ours(Some(7))]).unwrap();
        assert!(finding.found.contains("program 7"), "{finding:?}");
    }

    #[test]
    fn a_map_pin_must_be_the_map_the_programs_use() {
        let map = |id| Pinned::Map {
            id,
            about: format!("a LruHash map `conntrack` (map id {id})"),
        };
        assert_eq!(judge_map_pin(12, &map(12)), None);
        let finding = judge_map_pin(12, &Pinned::Nothing).unwrap();
        assert_eq!(finding.fix, Fix::Attach);
        assert!(!finding.foreign);
        assert!(finding.found.contains("no longer pinned"), "{finding:?}");
        // A fresh map pinned under the name: named, replaced.
        let finding = judge_map_pin(12, &map(13)).unwrap();
        assert_eq!(finding.fix, Fix::ReplacePin);
        assert!(finding.foreign);
        assert!(finding.found.contains("map id 13"), "{finding:?}");
        assert!(finding.found.contains("(id 12)"), "{finding:?}");
        let finding = judge_map_pin(12, &tcx_link(4, 5, 6)).unwrap();
        assert_eq!(finding.fix, Fix::ReplacePin);
    }

    fn repair(key: &str, outcome: Result<&str, &str>) -> Repair {
        Repair {
            key: key.into(),
            what: format!("to_pod on veth{key} (ifindex 7)"),
            found: "was detached (its tcx link 41 ...)".into(),
            outcome: outcome.map(str::to_owned).map_err(str::to_owned),
            foreign: false,
        }
    }

    #[test]
    fn each_repair_is_logged_with_what_was_found_and_counted() {
        let mut log = RepairLog::default();
        let now = Instant::now();
        let lines = log.record(
            &[
                repair("a", Ok("re-attached (tcx link id 42)")),
                repair("b", Err("attaching: EPERM")),
            ],
            now,
        );
        assert_eq!(
            lines,
            [
                (
                    Level::Warn,
                    "repaired: to_pod on vetha (ifindex 7) was detached (its tcx link 41 ...); \
                     re-attached (tcx link id 42)"
                        .to_owned()
                ),
                (
                    Level::Error,
                    "not repaired: to_pod on vethb (ifindex 7) was detached (its tcx link 41 \
                     ...); attaching: EPERM"
                        .to_owned()
                ),
            ]
        );
        assert_eq!((log.repaired, log.failed), (1, 1));
        // A foreign object is an error even when repaired.
        let foreign = Repair {
            foreign: true,
            ..repair("c", Ok("pinned map id 3 in its place"))
        };
        assert_eq!(log.record(&[foreign], now)[0].0, Level::Error);
    }

    #[test]
    fn a_component_that_keeps_breaking_is_logged_once_per_window() {
        let mut log = RepairLog::default();
        let start = Instant::now();
        let fixed = repair("a", Ok("re-attached"));
        assert_eq!(log.record(std::slice::from_ref(&fixed), start).len(), 1);
        // Every 30 s (the default resync) for the rest of the window: counted, not logged.
        let mut at = start;
        for _ in 0..9 {
            at += Duration::from_secs(30);
            assert!(log.record(std::slice::from_ref(&fixed), at).is_empty());
        }
        assert_eq!(log.repaired, 10);
        // Another component is not held back by it.
        assert_eq!(log.record(&[repair("b", Ok("re-attached"))], at).len(), 1);
        // Once the window is over, one line saying how many went unlogged.
        at += Duration::from_secs(30);
        let lines = log.record(std::slice::from_ref(&fixed), at);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0]
                .1
                .ends_with("(9 earlier repairs of it in the last 5 min not logged)"),
            "{lines:?}"
        );
        // And the count starts again.
        at += RepairLog::WINDOW;
        let lines = log.record(&[fixed], at);
        assert!(!lines[0].1.contains("earlier"), "{lines:?}");
    }

    #[test]
    fn a_pass_logs_a_bounded_number_of_lines() {
        let mut log = RepairLog::default();
        let repairs: Vec<Repair> = (0..50)
            .map(|i| repair(&i.to_string(), Ok("re-attached")))
            .collect();
        let lines = log.record(&repairs, Instant::now());
        assert_eq!(lines.len(), RepairLog::LINES_PER_PASS + 1);
        assert_eq!(
            lines.last().unwrap().1,
            "30 more repairs in this pass not logged one by one"
        );
        assert_eq!(log.repaired, 50);
    }
}
