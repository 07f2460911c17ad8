//! Host traffic: the cgroup `sock_addr` programs (ebpf/src/sock.rs) that balance the sockets
//! of the node's own network namespace, attached to the cgroup v2 `sluice agent
//! --cgroup-root` names.
//!
//! ```text
//! <pin>/cgroup-links/<program>    the cgroup link running <program> (sock_connect4, ...)
//! <pin>/sock_config               the node's network namespace cookie (sluice-common)
//! <pin>/sock_revnat, sock_revnat6 the translated sockets, for their replies
//! ```
//!
//! As with the tc links, the pins keep the programs running while no agent runs, and a
//! restarted agent swaps its freshly loaded programs into the pinned links atomically
//! (`BPF_LINK_UPDATE`: no connect() is ever missed). A pinned link attached to another cgroup
//! than the one asked for (the flag changed) or to a cgroup that is gone is replaced. Every
//! resync checks the links and puts back a detached or unpinned one (repair.rs). The
//! programs are loaded into the kernel only when first attached, so `sluice trace` and the
//! `BPF_PROG_RUN` tests (which cannot run them) do not pay for their verification.
//!
//! aya 0.14 has no `attach_to_link` for cgroup programs and does not show a link's cgroup, so
//! the three bpf(2) commands that needs are issued here directly.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr},
};
use sluice_common::{
    SockConfig, SockRevKey, SockRevKey6, SockRevValue, SockRevValue6, MAP_SOCK_CONFIG,
};
use tracing::{debug, info};

use super::Datapath;

/// Subdirectory of the pin directory holding the cgroup links.
pub(super) const CGROUP_LINKS_DIR: &str = "cgroup-links";

/// The socket programs, in the order they are attached.
pub const SOCK_PROGRAMS: [&str; 8] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
    "sock_connect6",
    "sock_sendmsg6",
    "sock_recvmsg6",
    "sock_getpeername6",
];

/// The socket programs' maps that only they use. Kept open for as long as the programs may
/// still be loaded: the object's instructions refer to the maps by these file descriptors.
pub struct SockMaps {
    pub(super) config: Array<MapData, SockConfig>,
    pub(super) _revnat: HashMap<MapData, SockRevKey, SockRevValue>,
    pub(super) _revnat6: HashMap<MapData, SockRevKey6, SockRevValue6>,
}

/// Where and how the socket programs are attached ([`Datapath::attach_cgroup`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupAttachment {
    /// The cgroup v2 directory.
    pub cgroup: PathBuf,
    /// The network namespace cookie written to `sock_config`.
    pub netns_cookie: u64,
    /// Pinned links whose program was swapped in place (the rest were created).
    pub replaced: usize,
}

impl Datapath {
    /// Runs the socket programs for every process of the cgroup v2 `cgroup` (and its
    /// descendants) whose sockets live in this process's network namespace: writes this
    /// namespace's cookie to `sock_config`, then attaches each program with a link pinned at
    /// `<pin>/cgroup-links/<program>`, or swaps it into the link an earlier agent pinned there.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> anyhow::Result<CgroupAttachment> {
        let Some(pin_path) = self.pin_path.clone() else {
            bail!(
                "cannot attach to cgroup {}: this datapath has private maps (load_unpinned)",
                cgroup.display()
            );
        };
        let cgroup_id = cgroup_id(cgroup)?;
        let netns_cookie = own_netns_cookie()?;
        self.sock
            .config
            .set(0, SockConfig { netns_cookie }, 0)
            .with_context(|| format!("writing the {MAP_SOCK_CONFIG} map"))?;

        let links_dir = pin_path.join(CGROUP_LINKS_DIR);
        fs::create_dir_all(&links_dir)
            .with_context(|| format!("creating {}", links_dir.display()))?;
        let mut replaced = 0;
        for name in SOCK_PROGRAMS {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .with_context(|| format!("the eBPF object has no program `{name}`"))?
                .try_into()
                .with_context(|| format!("program `{name}` is not a cgroup sock_addr program"))?;
            if program.fd().is_err() {
                load_retrying(program).map_err(|e| super::refused(name, &e))?;
            }
            let link_pin = links_dir.join(name);
            let swapped = attach_one(program, cgroup, cgroup_id, &link_pin).with_context(|| {
                format!(
                    "attaching `{name}` to cgroup {}, link pinned at {}",
                    cgroup.display(),
                    link_pin.display()
                )
            })?;
            replaced += usize::from(swapped);
        }
        self.cgroup = Some(cgroup.to_owned());
        info!(
            cgroup = %cgroup.display(),
            netns_cookie,
            replaced,
            "socket programs attached: host traffic is balanced at connect()"
        );
        Ok(CgroupAttachment {
            cgroup: cgroup.to_owned(),
            netns_cookie,
            replaced,
        })
    }

    /// Detaches the socket programs (unpins their links); succeeds when none is attached. The
    /// agent calls it when started without `--cgroup-root`, so an earlier agent's links do not
    /// outlive the flag.
    pub fn detach_cgroup(&mut self) -> anyhow::Result<usize> {
        self.cgroup = None;
        let Some(pin_path) = &self.pin_path else {
            return Ok(0);
        };
        remove_cgroup_links(pin_path)
    }

    /// The cgroup the socket programs were attached to, if they were.
    pub fn attached_cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }

    /// The id of the loaded socket program `name` (`None`: not loaded, so never attached).
    pub(super) fn sock_program_id(&self, name: &str) -> Option<u32> {
        let program: &CgroupSockAddr = self.ebpf.program(name)?.try_into().ok()?;
        program.fd().ok()?;
        program.info().ok().map(|info| info.id())
    }

    /// Attaches the socket program `name` again (repair.rs): swapped into the link pinned at
    /// `link_pin` when that one runs on `cgroup`, else a new link pinned there (a pinned link
    /// of another cgroup, or detached, is unpinned first). Returns whether it swapped.
    pub(super) fn reattach_sock_program(
        &mut self,
        name: &str,
        cgroup: &Path,
        cgroup_id: u64,
        link_pin: &Path,
    ) -> anyhow::Result<bool> {
        let program: &mut CgroupSockAddr = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program `{name}`"))?
            .try_into()
            .with_context(|| format!("program `{name}` is not a cgroup sock_addr program"))?;
        attach_one(program, cgroup, cgroup_id, link_pin)
    }

    /// The pinned socket program links: (program, link id, id of the cgroup it runs on), as
    /// the kernel reports them; for tests and diagnostics.
    pub fn cgroup_links(&self) -> anyhow::Result<Vec<(String, u32, u64)>> {
        let Some(pin_path) = &self.pin_path else {
            return Ok(Vec::new());
        };
        let mut links = Vec::new();
        for name in SOCK_PROGRAMS {
            let path = pin_path.join(CGROUP_LINKS_DIR).join(name);
            match obj_get(&path) {
                Ok(fd) => {
                    let (link_id, cgroup_id) = link_info(fd.as_fd())?;
                    links.push((name.to_owned(), link_id, cgroup_id));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
            }
        }
        Ok(links)
    }
}

/// Loads `program`, again when the kernel says EAGAIN: the verifier gives up with EAGAIN when
/// the loading thread has a signal pending (also a freezer's), so libbpf retries it, up to 5
/// times; so does this.
fn load_retrying(program: &mut CgroupSockAddr) -> Result<(), aya::programs::ProgramError> {
    let mut attempts = 5;
    loop {
        match program.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts > 1 =>
            {
                attempts -= 1;
                debug!("program load interrupted (EAGAIN), retrying");
            }
            result => return result,
        }
    }
}

/// Attaches `program` to the cgroup, or swaps it into the link pinned at `link_pin` when that
/// link runs on the same cgroup. Returns whether it swapped.
fn attach_one(
    program: &mut CgroupSockAddr,
    cgroup: &Path,
    cgroup_id: u64,
    link_pin: &Path,
) -> anyhow::Result<bool> {
    match obj_get(link_pin) {
        Ok(link) => {
            let (_, pinned_cgroup) = link_info(link.as_fd())?;
            if pinned_cgroup == cgroup_id {
                let prog_fd = program.fd()?;
                match link_update(link.as_fd(), prog_fd.as_fd()) {
                    Ok(()) => return Ok(true),
                    // The cgroup was removed (its id cannot come back): the link is defunct.
                    Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
                    Err(e) => return Err(e).context("BPF_LINK_UPDATE of the pinned link"),
                }
            } else {
                debug!(
                    pinned_cgroup,
                    cgroup_id, "pinned link runs on another cgroup: replacing it"
                );
            }
            // Unpinning the last reference detaches the old link.
            fs::remove_file(link_pin)
                .with_context(|| format!("unpinning {}", link_pin.display()))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("opening {}", link_pin.display())),
    }
    let dir = fs::File::open(cgroup)
        .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
    // Cgroup links are always attached in multi mode, with no flags.
    let link_id = program
        .attach(dir, CgroupAttachMode::Single)
        .context("bpf_link_create")?;
    let link: FdLink = program.take_link(link_id)?.try_into()?;
    // Should pinning fail, `link` is dropped and the program detached again.
    link.pin(link_pin)?;
    Ok(false)
}

/// Unpins every cgroup link under `pin_path` (and the directory); returns how many.
pub(super) fn remove_cgroup_links(pin_path: &Path) -> anyhow::Result<usize> {
    let links_dir = pin_path.join(CGROUP_LINKS_DIR);
    let entries = match fs::read_dir(&links_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("listing {}", links_dir.display())),
    };
    let mut removed = 0;
    for entry in entries {
        let path = entry
            .with_context(|| format!("listing {}", links_dir.display()))?
            .path();
        fs::remove_file(&path).with_context(|| format!("unpinning link {}", path.display()))?;
        removed += 1;
    }
    fs::remove_dir(&links_dir).with_context(|| format!("removing {}", links_dir.display()))?;
    if removed > 0 {
        info!(removed, "socket programs detached");
    }
    Ok(removed)
}

/// A cgroup v2 directory's id (the kernel's cgroup id is the directory's inode number on
/// cgroup2fs), checking it is one.
pub(super) fn cgroup_id(cgroup: &Path) -> anyhow::Result<u64> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let c_path = CString::new(cgroup.as_os_str().as_encoded_bytes())
        .with_context(|| format!("bad path {}", cgroup.display()))?;
    // SAFETY: statfs is plain data; zeroed is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated, stat is a valid out pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("cgroup {}", cgroup.display()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between libcs
    if stat.f_type as i64 != CGROUP2_SUPER_MAGIC {
        bail!(
            "{} is not a cgroup v2 directory (not on a cgroup2 filesystem)",
            cgroup.display()
        );
    }
    Ok(fs::metadata(cgroup)
        .with_context(|| format!("cgroup {}", cgroup.display()))?
        .ino())
}

/// The cookie of this process's network namespace (`SO_NETNS_COOKIE`, kernel >= 5.14), as the
/// programs' `bpf_get_netns_cookie` sees it.
pub fn own_netns_cookie() -> anyhow::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .context("opening a socket to read the network namespace cookie")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the out pointers are valid for the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .context("getsockopt(SO_NETNS_COOKIE) (kernel 5.14 or later needed)");
    }
    Ok(cookie)
}

// The bpf(2) commands aya does not offer for cgroup links (uapi/linux/bpf.h); the helpers
// below also serve resize.rs.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `union bpf_attr` is larger; the kernel wants the bytes it does not know zeroed.
pub(super) const ATTR_SIZE: usize = 64;

pub(super) fn sys_bpf(cmd: libc::c_long, attr: &mut [u8; ATTR_SIZE]) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialised buffer of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), ATTR_SIZE) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

pub(super) fn put_u32(attr: &mut [u8; ATTR_SIZE], offset: usize, value: u32) {
    attr[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
}

pub(super) fn put_u64(attr: &mut [u8; ATTR_SIZE], offset: usize, value: u64) {
    attr[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
}

/// Opens a pinned object (`BPF_OBJ_GET`: pathname u64, bpf_fd u32, file_flags u32).
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u8; ATTR_SIZE];
    put_u64(&mut attr, 0, c_path.as_ptr() as u64);
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A cgroup link's id and the id of the cgroup it is attached to (`struct bpf_link_info`:
/// type, id, prog_id, then at 16 `cgroup.cgroup_id`).
fn link_info(link: BorrowedFd<'_>) -> anyhow::Result<(u32, u64)> {
    const BPF_LINK_TYPE_CGROUP: u32 = 3;
    let mut info = [0u8; 64];
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64);
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).context("BPF_OBJ_GET_INFO_BY_FD on a link")?;
    let link_type = u32::from_ne_bytes(info[0..4].try_into().expect("4 bytes"));
    if link_type != BPF_LINK_TYPE_CGROUP {
        bail!("the pinned link is not a cgroup link (type {link_type})");
    }
    Ok((
        u32::from_ne_bytes(info[4..8].try_into().expect("4 bytes")),
        u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes")),
    ))
}

/// Swaps `prog` into the link (`BPF_LINK_UPDATE`: link_fd u32, new_prog_fd u32, flags u32).
fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u8; ATTR_SIZE];
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    sys_bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// What the socket programs do with a `connect()` or `sendmsg()` of the node to a
/// destination, worked out from the maps the way ebpf/src/sock.rs reads them. `sluice trace
/// --from host` reports it: `BPF_PROG_RUN` cannot run cgroup `sock_addr` programs, so this is
/// the same lookups, not a run of the programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SocketDecision {
    /// Not a frontend: the socket keeps the address it was given.
    Untranslated,
    /// The call fails with `errno` (`ECONNREFUSED`: no endpoints; `EPERM`: none this node may
    /// use, or a source outside loadBalancerSourceRanges).
    Refused { errno: i32 },
    /// The socket gets one of `backends` (TCP: at random; UDP: by socket cookie), or the
    /// node's affinity backend with sessionAffinity.
    Translated {
        backends: Vec<std::net::SocketAddr>,
        /// The frontend's pods' entry (`SCOPE_POD`) was used.
        pod_scope: bool,
        affinity: bool,
    },
}

impl Datapath {
    /// [`SocketDecision`] for the node reaching `dst:dport` over `proto` (IPv4 from the kernel
    /// maps; IPv6 from what the sync programmed into `services6`).
    pub fn socket_decision(
        &self,
        dst: std::net::IpAddr,
        dport: u16,
        proto: u8,
    ) -> anyhow::Result<SocketDecision> {
        use sluice_common::{
            ServiceKey, SCOPE_ALL, SCOPE_POD, SVC_F_AFFINITY, SVC_F_DROP_WHEN_EMPTY,
            SVC_F_EXTERNAL_LOCAL, SVC_F_SOURCE_RANGES,
        };
        use std::net::{IpAddr, Ipv4Addr, SocketAddr};
        if proto != sluice_common::PROTO_TCP && proto != sluice_common::PROTO_UDP {
            return Ok(SocketDecision::Untranslated);
        }
        let ip = match dst {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => {
                let Some((_, _, _, _, backends)) = self
                    .programmed_services6()
                    .into_iter()
                    .find(|(a, p, pr, _, _)| (*a, *p, *pr) == (ip, dport, proto))
                else {
                    return Ok(SocketDecision::Untranslated);
                };
                if backends.is_empty() {
                    return Ok(SocketDecision::Refused {
                        errno: libc::ECONNREFUSED,
                    });
                }
                return Ok(SocketDecision::Translated {
                    backends: backends
                        .iter()
                        .map(|b| SocketAddr::new(b.ip, b.port))
                        .collect(),
                    pod_scope: false,
                    affinity: false,
                });
            }
        };
        let maps = self.services.maps();
        let mut key = ServiceKey {
            addr: u32::from_ne_bytes(ip.octets()),
            port: dport.to_be(),
            proto,
            scope: SCOPE_ALL,
        };
        let lookup = |key: &ServiceKey| match maps.services.get(key, 0) {
            Ok(value) => Ok(Some(value)),
            Err(e) if super::sync::is_not_found(&e) => Ok(None),
            Err(e) => Err(e).context("reading the services map"),
        };
        // As the program: the pods' entry only for a frontend with SVC_F_EXTERNAL_LOCAL.
        let Some(all) = lookup(&key)? else {
            return Ok(SocketDecision::Untranslated);
        };
        key.scope = SCOPE_POD;
        let (service, pod_scope) = match all.flags & SVC_F_EXTERNAL_LOCAL {
            0 => (all, false),
            _ => match lookup(&key)? {
                Some(value) => (value, true),
                None => (all, false),
            },
        };
        if service.flags & SVC_F_SOURCE_RANGES != 0 {
            let node_ip = self.node_config.node_ip;
            let range = super::sync::SourceRange::new(
                service.id,
                &ipnet::Ipv4Net::new(Ipv4Addr::from(node_ip.to_ne_bytes()), 32).expect("a /32"),
            );
            if maps.source_ranges.get(&range.key(), 0).is_err() {
                return Ok(SocketDecision::Refused { errno: libc::EPERM });
            }
        }
        if service.backend_count == 0 {
            let errno = if service.flags & SVC_F_DROP_WHEN_EMPTY != 0 {
                libc::EPERM
            } else {
                libc::ECONNREFUSED
            };
            return Ok(SocketDecision::Refused { errno });
        }
        let mut backends = Vec::new();
        for slot in 0..service.backend_count {
            let backend_key = sluice_common::BackendKey {
                service_id: service.id,
                slot,
            };
            let backend = maps
                .backends
                .get(&backend_key, 0)
                .with_context(|| format!("reading slot {slot} of service {}", service.id))?;
            backends.push(SocketAddr::from((
                Ipv4Addr::from(backend.addr.to_ne_bytes()),
                u16::from_be(backend.port),
            )));
        }
        backends.sort();
        backends.dedup();
        Ok(SocketDecision::Translated {
            backends,
            pod_scope,
            affinity: service.flags & SVC_F_AFFINITY != 0,
        })
    }
}
