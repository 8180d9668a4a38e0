//! cgroup v2: where it is mounted, which cgroups match the user's patterns, which
//! processes are in them, and each cgroup's id (what `bpf_get_current_cgroup_id` returns:
//! the inode number of its directory).
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use globset::{GlobSet, GlobSetBuilder};

/// Deepest cgroup nesting walked when matching patterns (real hierarchies are < 10).
const MAX_DEPTH: usize = 32;

/// The cgroup v2 hierarchy: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified`
/// on hybrid ones.
#[derive(Clone, Debug)]
pub struct Hierarchy {
    pub mount: PathBuf,
}

impl Hierarchy {
    /// Finds the cgroup2 mount in `/proc/self/mountinfo`.
    pub fn find() -> Result<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .context("reading /proc/self/mountinfo")?;
        Self::from_mountinfo(&mountinfo).context("no cgroup v2 hierarchy is mounted")
    }

    pub fn from_mountinfo(mountinfo: &str) -> Option<Self> {
        // "36 25 0:31 / /sys/fs/cgroup/unified rw,... shared:9 - cgroup2 cgroup2 rw"
        let mounts = mountinfo.lines().filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
        });
        // Prefer the conventional places when several are mounted.
        let mut all: Vec<PathBuf> = mounts.collect();
        all.sort_by_key(|m| {
            (
                m != Path::new("/sys/fs/cgroup"),
                m != Path::new("/sys/fs/cgroup/unified"),
            )
        });
        all.into_iter().next().map(|mount| Self { mount })
    }

    /// The id of the cgroup at `path` (relative to the mount, with or without a leading /).
    /// A container found only in a cgroup v1 hierarchy (a v1 path, see [`crate::hybrid`])
    /// has no v2 cgroup of its own: it gets a key of its own instead.
    pub fn id(&self, path: &str) -> Result<u64> {
        if let Some(key) = crate::hybrid::key(path) {
            return Ok(key);
        }
        let dir = self.dir(path);
        Ok(std::fs::metadata(&dir)
            .with_context(|| format!("{}", dir.display()))?
            .ino())
    }

    /// The directory of the cgroup at `path`; for a v1 path, its directory in the v1 memory
    /// controller when that holds it (else a path that does not exist).
    pub fn dir(&self, path: &str) -> PathBuf {
        if crate::hybrid::split(path).is_some() {
            return crate::hybrid::memory_dir(path).unwrap_or_default();
        }
        self.mount.join(path.trim_start_matches('/'))
    }

    /// The processes in the cgroup at `path` (not its descendants).
    pub fn processes(&self, path: &str) -> Result<Vec<u32>> {
        if crate::hybrid::split(path).is_some() {
            anyhow::bail!("{path} is a cgroup v1 path (see hybrid::V1Container::processes)");
        }
        let file = self.dir(path).join("cgroup.procs");
        let text = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Every cgroup (as "/a/b") whose path relative to the mount matches one of `patterns`.
    pub fn matching(&self, patterns: &Patterns) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![(self.mount.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let path = entry.path();
                let Ok(relative) = path.strip_prefix(&self.mount) else {
                    continue;
                };
                let relative = relative.to_string_lossy().into_owned();
                if patterns.set.is_match(&relative) {
                    found.push(format!("/{relative}"));
                }
                if depth + 1 < MAX_DEPTH {
                    stack.push((path, depth + 1));
                }
            }
        }
        found.sort();
        found
    }
}

/// Glob patterns over cgroup paths relative to the mount: `*` stays within one level,
/// `**` crosses levels (`kubepods.slice/**`).
#[derive(Clone, Debug)]
pub struct Patterns {
    set: GlobSet,
    pub sources: Vec<String>,
}

impl Patterns {
    pub fn new(patterns: &[String]) -> Result<Self> {
        let mut builder = GlobSetBuilder::new();
        for pattern in patterns {
            let glob = globset::GlobBuilder::new(pattern.trim_start_matches('/'))
                .literal_separator(true)
                .build()
                .with_context(|| format!("bad cgroup pattern {pattern:?}"))?;
            builder.add(glob);
        }
        Ok(Self {
            set: builder.build()?,
            sources: patterns.to_vec(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

/// The cgroup v2 path of a process ("/a/b"), from `/proc/PID/cgroup`.
pub fn of_process(pid: u32) -> Result<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    parse_proc_cgroup(&text).with_context(|| format!("/proc/{pid}/cgroup has no cgroup v2 line"))
}

/// The `0::/path` line of a `/proc/PID/cgroup` text.
pub fn parse_proc_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "30 24 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n\
                      31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                      32 30 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            Hierarchy::from_mountinfo(hybrid).unwrap().mount,
            Path::new("/sys/fs/cgroup/unified")
        );
        let unified = "29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Hierarchy::from_mountinfo(unified).unwrap().mount,
            Path::new("/sys/fs/cgroup")
        );
        assert!(Hierarchy::from_mountinfo("1 2 3:4 / / rw - ext4 /dev/vda rw\n").is_none());
    }

    #[test]
    fn reads_the_v2_line() {
        let text = "12:memory:/foo\n1:name=systemd:/bar\n0::/system.slice/x.service\n";
        assert_eq!(
            parse_proc_cgroup(text).as_deref(),
            Some("/system.slice/x.service")
        );
        assert_eq!(parse_proc_cgroup("12:memory:/foo\n"), None);
    }

    #[test]
    fn star_stays_in_one_level() {
        let patterns = Patterns::new(&["memtrace-test/*".into(), "/pods/**/app".into()]).unwrap();
        assert!(patterns.set.is_match("memtrace-test/leaky"));
        assert!(!patterns.set.is_match("memtrace-test/leaky/child"));
        assert!(patterns.set.is_match("pods/a/b/app"));
        assert!(Patterns::new(&["[".into()]).is_err());
    }

    #[test]
    fn this_process_has_a_cgroup_with_an_id() {
        let hierarchy = Hierarchy::find().unwrap();
        let path = of_process(std::process::id()).unwrap();
        assert!(hierarchy.id(&path).unwrap() > 0);
        assert!(
            hierarchy
                .processes(&path)
                .unwrap()
                .contains(&std::process::id())
        );
    }
}
