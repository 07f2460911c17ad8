//! The manifests directory as the agent keeps reading it: parsed files reused while
//! unchanged, parsing off the agent's loop with a time budget, and one definition per object
//! however many files name it.
//!
//! * A file is parsed again only when it changed (same inode, size and modification time:
//!   reused; a file replaced by a rename gets a new inode). [`ManifestCache::verify`] (the
//!   agent's periodic resync) reads every file and parses those whose content differs.
//! * Parsing runs on its own thread. A load waits for it up to its budget; a file still being
//!   parsed after that keeps its previous objects in effect, is reported, and the agent is
//!   told to load again when it is done. The loop that programs the datapath therefore never
//!   waits on one file for long ([`super::limits`] bounds what a parse can cost at all).
//! * An object defined by two files is a conflict: the definition in effect stays (at start,
//!   the first file's in name order), the other is reported with both files and ignored until
//!   one of them goes. A second file can therefore never take a Service over silently.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use super::{manifest_files, parse_file, ManifestError, Objects};

/// What one [`ManifestCache::load_dir`] gives.
pub struct Loaded {
    pub objects: Arc<Objects>,
    /// Every file's problems and every conflict, as of now.
    pub errors: Vec<ManifestError>,
    /// What changed in the directory that is not a problem but must be said (a file gone, and
    /// with it the objects it defined), once each.
    pub notes: Vec<String>,
    /// Files still being parsed (their previous objects are in effect meanwhile).
    pub parsing: usize,
}

/// Called from a parsing thread when its file is done (the agent loads again).
pub type Notify = Arc<dyn Fn() + Send + Sync>;

#[derive(Default)]
pub struct ManifestCache {
    files: BTreeMap<PathBuf, CachedFile>,
    /// Every file's objects merged, one definition per object, shared with the caller: when
    /// the caller has let go of the last view, an update changes it in place.
    merged: Arc<Objects>,
    /// The next load compares every file's content, not only its stamp.
    verify: bool,
    /// Objects defined by more than one file ("Kind ns/name"): the ignored definitions.
    conflicts: BTreeMap<String, Vec<ManifestError>>,
    parsing: Parsing,
    /// How long a load waits for parsing; `None`: until it is done.
    budget: Option<Duration>,
}

struct CachedFile {
    stamp: FileStamp,
    /// A hash of the content the objects were parsed from.
    content: u64,
    objects: Objects,
    errors: Vec<ManifestError>,
}

/// Parses in flight, by file: the content being parsed.
struct Parsing {
    jobs: BTreeMap<PathBuf, Job>,
    done_tx: mpsc::Sender<Parsed>,
    done_rx: mpsc::Receiver<Parsed>,
    notify: Option<Notify>,
    /// [`parse_file`]; a test's parser holds a file back to show a parse outliving its load.
    parse: Parse,
}

type Parse = Arc<dyn Fn(&Path, &[u8]) -> (Objects, Vec<ManifestError>) + Send + Sync>;

struct Job {
    /// The file's stamp when it was read: a load that finds it unchanged does not read the
    /// file again while it is parsed.
    stamp: FileStamp,
    content: u64,
}

struct Parsed {
    file: PathBuf,
    content: u64,
    stamp: FileStamp,
    objects: Objects,
    errors: Vec<ManifestError>,
}

impl Default for Parsing {
    fn default() -> Self {
        let (done_tx, done_rx) = mpsc::channel();
        Parsing {
            jobs: BTreeMap::new(),
            done_tx,
            done_rx,
            notify: None,
            parse: Arc::new(parse_file),
        }
    }
}

fn content_hash(text: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// (inode, size, mtime seconds, mtime nanoseconds).
type FileStamp = (u64, u64, i64, i64);

fn stamp_of(file: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(file).ok()?;
    Some((m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

impl ManifestCache {
    /// A cache whose loads wait at most `budget` for parsing (`None`: until it is done);
    /// `notify` is called when a parse is done, from its thread.
    pub fn with_budget(budget: Option<Duration>, notify: Notify) -> Self {
        let mut cache = ManifestCache {
            budget,
            ..ManifestCache::default()
        };
        cache.parsing.notify = Some(notify);
        cache
    }

    /// How long later loads wait for parsing (`None`: until it is done).
    pub fn set_budget(&mut self, budget: Option<Duration>) {
        self.budget = budget;
    }

    /// Reads the directory: files that changed since the last call are parsed, and only the
    /// objects those files define (or defined) are decided again.
    pub fn load_dir(&mut self, dir: &Path) -> anyhow::Result<Loaded> {
        let files = manifest_files(dir)
            .map_err(|e| anyhow::anyhow!("reading manifest directory {}: {e}", dir.display()))?;
        let verify = std::mem::take(&mut self.verify);
        let mut notes = Vec::new();
        // The objects of files that changed or went away, as they were.
        let mut replaced: Vec<Objects> = Vec::new();
        let mut parsed_now: Vec<PathBuf> = Vec::new();
        let listed: BTreeSet<&PathBuf> = files.iter().collect();
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|f| !listed.contains(f))
            .cloned()
            .collect();
        for file in gone {
            let old = self.files.remove(&file).expect("listed above");
            notes.push(gone_note(&file, &old.objects));
            replaced.push(old.objects);
        }
        self.parsing.jobs.retain(|file, _| listed.contains(file));

        for file in &files {
            let Some(stamp) = stamp_of(file) else {
                // Vanished between the listing and the stat: as if it were not listed.
                if let Some(old) = self.files.remove(file) {
                    notes.push(gone_note(file, &old.objects));
                    replaced.push(old.objects);
                }
                self.parsing.jobs.remove(file);
                continue;
            };
            let cached = self.files.get_mut(file);
            let parsing_it = self
                .parsing
                .jobs
                .get(file)
                .is_some_and(|j| j.stamp == stamp);
            if (cached.as_ref().is_some_and(|c| c.stamp == stamp) || parsing_it) && !verify {
                continue;
            }
            let read = super::limits::read_file(file, stamp.1);
            let content = match &read {
                Ok(bytes) => content_hash(bytes),
                Err(e) => content_hash(e.as_bytes()),
            };
            if let Some(cached) = cached {
                if cached.content == content {
                    // Touched or verified, but the same content: the same objects.
                    cached.stamp = stamp;
                    continue;
                }
            }
            if self
                .parsing
                .jobs
                .get(file)
                .is_some_and(|j| j.content == content)
            {
                continue; // being parsed already
            }
            self.parsing
                .jobs
                .insert(file.clone(), Job { stamp, content });
            let done = self.parsing.done_tx.clone();
            let notify = self.parsing.notify.clone();
            let parse = Arc::clone(&self.parsing.parse);
            let path = file.clone();
            // A thread of its own: the caller waits for it only up to the budget, and a
            // parse that outlives the agent must not hold its exit (as a blocking task of
            // the runtime would).
            let spawned = std::thread::Builder::new()
                .name("manifest-parse".into())
                .spawn(move || {
                    let (objects, errors) = match read {
                        Ok(bytes) => parse(&path, &bytes),
                        Err(e) => (
                            Objects::default(),
                            vec![ManifestError {
                                file: path.clone(),
                                object: "file".into(),
                                message: e,
                            }],
                        ),
                    };
                    let _ = done.send(Parsed {
                        file: path,
                        content,
                        stamp,
                        objects,
                        errors,
                    });
                    if let Some(notify) = notify {
                        notify();
                    }
                });
            if let Err(e) = spawned {
                self.parsing.jobs.remove(file);
                anyhow::bail!("starting a thread to parse {}: {e}", file.display());
            }
        }

        // Wait for the parses, up to the budget.
        let deadline = self.budget.map(|b| Instant::now() + b);
        while !self.parsing.jobs.is_empty() {
            let result = match deadline {
                None => self
                    .parsing
                    .done_rx
                    .recv()
                    .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                Some(deadline) => self
                    .parsing
                    .done_rx
                    .recv_timeout(deadline.saturating_duration_since(Instant::now())),
            };
            let Ok(parsed) = result else {
                break;
            };
            self.accept(parsed, &mut replaced, &mut parsed_now);
        }
        // Results that came in since (a notify is on its way for them too).
        while let Ok(parsed) = self.parsing.done_rx.try_recv() {
            self.accept(parsed, &mut replaced, &mut parsed_now);
        }

        if !parsed_now.is_empty() || !replaced.is_empty() {
            let merged = Arc::make_mut(&mut self.merged);
            let files: Vec<(&Path, &Objects)> = self
                .files
                .iter()
                .map(|(p, f)| (p.as_path(), &f.objects))
                .collect();
            // Only the names a changed file defines, or defined, can have a new winner.
            let touched: Vec<&Objects> = replaced
                .iter()
                .chain(
                    parsed_now
                        .iter()
                        .filter_map(|path| self.files.get(path))
                        .map(|f| &f.objects),
                )
                .collect();
            merged.refresh(&files, &touched, &mut self.conflicts);
        }
        let mut errors: Vec<ManifestError> = self
            .files
            .values()
            .flat_map(|f| f.errors.iter().cloned())
            .collect();
        errors.extend(self.conflicts.values().flatten().cloned());
        for file in self.parsing.jobs.keys() {
            errors.push(ManifestError {
                file: file.clone(),
                object: "file".into(),
                // No running time in it: the agent logs a problem again only when it changes.
                message: format!(
                    "still being parsed: {} until it is done",
                    if self.files.contains_key(file) {
                        "its previous objects stay in effect"
                    } else {
                        "its objects are not programmed"
                    }
                ),
            });
        }
        Ok(Loaded {
            objects: Arc::clone(&self.merged),
            errors,
            notes,
            parsing: self.parsing.jobs.len(),
        })
    }

    /// Takes a finished parse if it is of the content the file has now.
    fn accept(
        &mut self,
        parsed: Parsed,
        replaced: &mut Vec<Objects>,
        parsed_now: &mut Vec<PathBuf>,
    ) {
        let current = self
            .parsing
            .jobs
            .get(&parsed.file)
            .is_some_and(|j| j.content == parsed.content);
        if !current {
            return; // the file changed again, or went away, meanwhile
        }
        self.parsing.jobs.remove(&parsed.file);
        let new = CachedFile {
            stamp: parsed.stamp,
            content: parsed.content,
            objects: parsed.objects,
            errors: parsed.errors,
        };
        if let Some(old) = self.files.insert(parsed.file.clone(), new) {
            replaced.push(old.objects);
        }
        parsed_now.push(parsed.file);
    }

    /// Makes the next load read every file and parse those whose content changed, whatever
    /// their stamps say.
    pub fn verify(&mut self) {
        self.verify = true;
    }
}

/// "file is gone: its objects are no longer defined" (up to 5 named).
fn gone_note(file: &Path, objects: &Objects) -> String {
    let names = objects.names();
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    format!(
        "{} is gone: {}",
        file.display(),
        match (names.len(), more) {
            (0, _) => "it defined no object Sluice uses".to_string(),
            (_, 0) => format!("no longer defined: {}", shown.join(", ")),
            (_, more) => format!("no longer defined: {} and {more} more", shown.join(", ")),
        }
    )
}

/// Why a definition is ignored: another file's is in effect.
fn conflict_message(in_effect: &Path) -> String {
    format!(
        "also defined in {}, whose definition is in effect; this one is ignored (one object, \
         one file: remove one of them)",
        in_effect.display()
    )
}

impl Objects {
    /// Re-decides, for every name in `touched`, which of `files` defines it: the file whose
    /// definition is in effect while it still defines it, else the first in name order. The
    /// other definitions are recorded in `conflicts`.
    fn refresh(
        &mut self,
        files: &[(&Path, &Objects)],
        touched: &[&Objects],
        conflicts: &mut BTreeMap<String, Vec<ManifestError>>,
    ) {
        fn kind<K: Ord + Clone + fmt::Display, V>(
            kind_name: &str,
            into: &mut BTreeMap<K, Arc<V>>,
            origins: &mut BTreeMap<String, PathBuf>,
            conflicts: &mut BTreeMap<String, Vec<ManifestError>>,
            files: &[(&Path, &BTreeMap<K, Arc<V>>)],
            touched: &[&BTreeMap<K, Arc<V>>],
        ) {
            let names: BTreeSet<&K> = touched.iter().flat_map(|m| m.keys()).collect();
            for name in names {
                let origin = format!("{kind_name} {name}");
                let candidates: Vec<(&Path, &Arc<V>)> = files
                    .iter()
                    .filter_map(|(path, objects)| objects.get(name).map(|o| (*path, o)))
                    .collect();
                let in_effect = origins.get(&origin).map(PathBuf::as_path);
                let winner = candidates
                    .iter()
                    .find(|(path, _)| Some(*path) == in_effect)
                    .or(candidates.first());
                let Some(&(path, object)) = winner else {
                    into.remove(name);
                    origins.remove(&origin);
                    conflicts.remove(&origin);
                    continue;
                };
                if !into.get(name).is_some_and(|o| Arc::ptr_eq(o, object)) {
                    into.insert(name.clone(), Arc::clone(object));
                }
                if in_effect != Some(path) {
                    origins.insert(origin.clone(), path.to_path_buf());
                }
                let ignored: Vec<ManifestError> = candidates
                    .iter()
                    .filter(|(other, _)| *other != path)
                    .map(|(other, _)| ManifestError {
                        file: other.to_path_buf(),
                        object: origin.clone(),
                        message: conflict_message(path),
                    })
                    .collect();
                if ignored.is_empty() {
                    conflicts.remove(&origin);
                } else {
                    conflicts.insert(origin, ignored);
                }
            }
        }
        macro_rules! refresh {
            ($($field:ident: $kind:literal),*) => {$(
                kind(
                    $kind,
                    &mut self.$field,
                    &mut self.origins,
                    conflicts,
                    &files.iter().map(|(p, f)| (*p, &f.$field)).collect::<Vec<_>>(),
                    &touched.iter().map(|f| &f.$field).collect::<Vec<_>>(),
                );
            )*};
        }
        refresh!(
            services: "Service",
            endpoint_slices: "EndpointSlice",
            nodes: "Node",
            pods: "Pod",
            namespaces: "Namespace",
            network_policies: "NetworkPolicy"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::{load_dir, ObjectRef};

    /// A directory of its own, removed when the test ends (even failing).
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!(
                "sluice-manifest-cache-{name}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn write(&self, file: &str, text: &str) {
            std::fs::write(self.0.join(file), text).unwrap();
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn service(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n"
        )
    }

    fn key(name: &str) -> ObjectRef {
        ObjectRef {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    /// `default/name=clusterIP` of every service.
    fn names(objects: &Objects) -> Vec<String> {
        objects
            .services
            .iter()
            .map(|(k, v)| {
                let ip = v
                    .spec
                    .as_ref()
                    .and_then(|s| s.cluster_ip.clone())
                    .unwrap_or_default();
                format!("{k}={ip}")
            })
            .collect()
    }

    /// The cache gives what a full read gives after files are added, rewritten in place,
    /// replaced by a rename, broken and removed; unchanged files are not parsed again.
    #[test]
    fn the_cache_reads_changed_files_and_matches_a_full_read() {
        let dir = Dir::new("reads");
        let mut cache = ManifestCache::default();
        let check = |cache: &mut ManifestCache| {
            let cached = cache.load_dir(&dir.0).unwrap();
            let (full, full_errors) = load_dir(&dir.0).unwrap();
            assert_eq!(names(&cached.objects), names(&full));
            assert_eq!(cached.errors, full_errors);
            names(&cached.objects)
        };
        dir.write("a.yaml", &service("a", "10.96.0.1"));
        dir.write("b.yaml", &service("b", "10.96.0.2"));
        assert_eq!(
            check(&mut cache),
            ["default/a=10.96.0.1", "default/b=10.96.0.2"]
        );
        assert_eq!(cache.files.len(), 2);
        // An unchanged file is not parsed again: rewritten in place with the same length and
        // its modification time put back, the cache still has the old object (what the
        // periodic resync's verify() repairs), while a full read sees the new one.
        let a = dir.0.join("a.yaml");
        let modified = std::fs::metadata(&a).unwrap().modified().unwrap();
        dir.write("a.yaml", &service("a", "10.96.0.9"));
        std::fs::File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        let reused = cache.load_dir(&dir.0).unwrap().objects;
        assert_eq!(names(&reused)[0], "default/a=10.96.0.1");
        drop(reused);
        // Verifying reads the content: the changed file is parsed, the unchanged one's
        // objects stay the same objects.
        let before = cache.load_dir(&dir.0).unwrap().objects;
        cache.verify();
        assert_eq!(
            check(&mut cache),
            ["default/a=10.96.0.9", "default/b=10.96.0.2"]
        );
        let after = cache.load_dir(&dir.0).unwrap().objects;
        assert!(Arc::ptr_eq(
            &before.services[&key("b")],
            &after.services[&key("b")]
        ));
        assert!(!Arc::ptr_eq(
            &before.services[&key("a")],
            &after.services[&key("a")]
        ));
        drop((before, after));
        // Rewritten in place with another length, and replaced by a rename.
        dir.write("a.yaml", &service("a", "10.96.0.11"));
        dir.write(".b.tmp", &service("b", "10.96.0.12"));
        std::fs::rename(dir.0.join(".b.tmp"), dir.0.join("b.yaml")).unwrap();
        assert_eq!(
            check(&mut cache),
            ["default/a=10.96.0.11", "default/b=10.96.0.12"]
        );
        // Broken: its objects are gone, the problem is reported; objects of unchanged files
        // are the same objects (the translation reuses its work for them by pointer).
        let before = cache.load_dir(&dir.0).unwrap().objects;
        dir.write("b.yaml", "kind: [");
        assert_eq!(check(&mut cache), ["default/a=10.96.0.11"]);
        let after = cache.load_dir(&dir.0).unwrap();
        assert_eq!(after.errors.len(), 1, "{:?}", after.errors);
        assert!(Arc::ptr_eq(
            &before.services[&key("a")],
            &after.objects.services[&key("a")]
        ));
        drop((before, after));
        // Removed: said once, with the objects it took along.
        dir.write("b.yaml", &service("b", "10.96.0.12"));
        check(&mut cache);
        std::fs::remove_file(dir.0.join("b.yaml")).unwrap();
        let loaded = cache.load_dir(&dir.0).unwrap();
        assert_eq!(names(&loaded.objects), ["default/a=10.96.0.11"]);
        assert_eq!(loaded.notes.len(), 1, "{:?}", loaded.notes);
        assert!(
            loaded.notes[0].ends_with("b.yaml is gone: no longer defined: Service default/b"),
            "{:?}",
            loaded.notes
        );
        assert!(cache.load_dir(&dir.0).unwrap().notes.is_empty());
        assert_eq!(cache.files.len(), 1);
    }

    /// An object defined in two files: the definition in effect stays whatever the other file
    /// says or where it sorts, both files are named, and when one goes the other is used.
    #[test]
    fn a_second_definition_never_takes_an_object_over() {
        let dir = Dir::new("conflicts");
        let mut cache = ManifestCache::default();
        dir.write("backend.yaml", &service("backend", "10.96.0.1"));
        let loaded = cache.load_dir(&dir.0).unwrap();
        assert_eq!(names(&loaded.objects), ["default/backend=10.96.0.1"]);
        assert_eq!(
            loaded.objects.origins["Service default/backend"],
            dir.0.join("backend.yaml")
        );
        // A later file and an earlier one (in name order) redefine it: ignored, each named.
        dir.write("zz-dup.yaml", &service("backend", "10.96.0.66"));
        dir.write("00-dup.yaml", &service("backend", "10.96.0.77"));
        let loaded = cache.load_dir(&dir.0).unwrap();
        assert_eq!(names(&loaded.objects), ["default/backend=10.96.0.1"]);
        let errors: Vec<String> = loaded.errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        for dup in ["00-dup.yaml", "zz-dup.yaml"] {
            assert!(
                errors.iter().any(|e| e.contains(&format!(
                    "{dup}: Service default/backend: also defined in {}, whose definition is in effect",
                    dir.0.join("backend.yaml").display()
                ))),
                "{errors:?}"
            );
        }
        // The file in effect is rewritten: still in effect, with its new content.
        dir.write("backend.yaml", &service("backend", "10.96.0.2"));
        let loaded = cache.load_dir(&dir.0).unwrap();
        assert_eq!(names(&loaded.objects), ["default/backend=10.96.0.2"]);
        assert_eq!(loaded.errors.len(), 2);
        // It goes: the first remaining file in name order takes over; one conflict is left.
        std::fs::remove_file(dir.0.join("backend.yaml")).unwrap();
        let loaded = cache.load_dir(&dir.0).unwrap();
        assert_eq!(names(&loaded.objects), ["default/backend=10.96.0.77"]);
        assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
        assert!(loaded.errors[0].file.ends_with("zz-dup.yaml"));
        std::fs::remove_file(dir.0.join("zz-dup.yaml")).unwrap();
        let loaded = cache.load_dir(&dir.0).unwrap();
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        // A fresh read (an agent's start, `sluice trace`) takes the first file in name order.
        dir.write("zz-dup.yaml", &service("backend", "10.96.0.66"));
        let (objects, errors) = load_dir(&dir.0).unwrap();
        assert_eq!(names(&objects), ["default/backend=10.96.0.77"]);
        assert_eq!(errors.len(), 1);
    }

    /// A file that takes longer to parse than a load waits: its previous objects stay in
    /// effect and it is reported, the other files' changes are taken at once, it is not parsed
    /// again meanwhile, and the agent is told when it is done.
    #[test]
    fn a_slow_file_does_not_hold_the_others() {
        let dir = Dir::new("slow");
        let (done_tx, done_rx) = mpsc::channel();
        let done_tx = std::sync::Mutex::new(done_tx);
        let mut cache = ManifestCache::with_budget(
            None,
            Arc::new(move || {
                let _ = done_tx.lock().unwrap().send(());
            }),
        );
        // big.yaml's parse waits until the test lets it go; every parse is counted.
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let parses = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&parses);
        let gated = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gate = Arc::clone(&gated);
        cache.parsing.parse = Arc::new(move |file: &Path, bytes: &[u8]| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if file.ends_with("big.yaml") && gate.load(std::sync::atomic::Ordering::SeqCst) {
                release_rx.lock().unwrap().recv().unwrap();
            }
            parse_file(file, bytes)
        });
        dir.write("big.yaml", &service("big", "10.96.0.1"));
        cache.load_dir(&dir.0).unwrap();
        while done_rx.try_recv().is_ok() {}
        cache.set_budget(Some(Duration::from_millis(200)));
        gated.store(true, std::sync::atomic::Ordering::SeqCst);
        let before = parses.load(std::sync::atomic::Ordering::SeqCst);

        dir.write("big.yaml", &service("big", "10.96.0.9"));
        dir.write("small.yaml", &service("small", "10.96.0.2"));
        let loaded = cache.load_dir(&dir.0).unwrap();
        assert_eq!(loaded.parsing, 1);
        assert_eq!(
            names(&loaded.objects),
            ["default/big=10.96.0.1", "default/small=10.96.0.2"],
            "big.yaml's previous object in effect, small.yaml's new one programmed"
        );
        assert!(
            loaded.errors.iter().any(|e| e.file.ends_with("big.yaml")
                && e.message.contains("its previous objects stay in effect")),
            "{:?}",
            loaded.errors
        );
        drop(loaded);
        // Loads while it is parsed neither wait for it nor parse it again.
        let started = Instant::now();
        assert_eq!(cache.load_dir(&dir.0).unwrap().parsing, 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(parses.load(std::sync::atomic::Ordering::SeqCst), before + 2);

        // Let go: told when done; the next load has it.
        release_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            done_rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("a parse-done notification");
            let loaded = cache.load_dir(&dir.0).unwrap();
            if loaded.parsing == 0 {
                assert_eq!(
                    names(&loaded.objects),
                    ["default/big=10.96.0.9", "default/small=10.96.0.2"]
                );
                assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
                break;
            }
        }
    }

    /// A pathological file is refused before the parser sees it, quickly, naming the file.
    #[test]
    fn a_megabyte_of_brackets_is_refused_at_once() {
        let dir = Dir::new("brackets");
        dir.write("bomb.yaml", &"[".repeat(2 << 20));
        dir.write("good.yaml", &service("good", "10.96.0.3"));
        let started = Instant::now();
        let (objects, errors) = load_dir(&dir.0).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(names(&objects), ["default/good=10.96.0.3"]);
        assert_eq!(errors.len(), 1);
        assert!(errors[0].file.ends_with("bomb.yaml"));
        assert!(
            errors[0].message.contains("nested more than 128 deep"),
            "{}",
            errors[0]
        );
    }
}
